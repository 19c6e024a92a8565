"""The HTML report: escaping, self-containment, saving/loading its inputs, and a real browser."""

from __future__ import annotations

import base64
import dataclasses
import html
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from quantlab.report import (
    HistogramView,
    ReportInputs,
    Verdict,
    load_report_inputs,
    render_comparison,
    render_report,
    save_report_inputs,
    write_report,
)

EVIL = "<script>alert(1)</script>"


def sample_inputs(layer_name: str = "stem_conv", title: str = "unit") -> ReportInputs:
    """A report's inputs with every section filled, as the experiment runner would assemble them."""
    rng = np.random.default_rng(0)
    layers = [layer_name, "block_conv1", "block_conv2", "dw_conv", "fc"]
    rows = []
    for cand, base in (("int8-minmax", 30.0), ("int8-entropy", 33.0)):
        acc = base - np.cumsum(rng.uniform(0, 3, len(layers)))
        for i, name in enumerate(layers):
            rows.append({"candidate": cand, "order": i, "layer": name, "op_type": "Conv",
                         "tensor": name + "_out", "accumulated": acc[i], "local": base + rng.normal(0, 4)})
    per_layer = pd.DataFrame(rows)
    e2e = pd.DataFrame({
        "candidate": ["fp16", "int8-minmax", "int8-entropy"],
        "cosine": [0.99999, 0.9921, 0.9943], "cosine_ci_low": [0.99998, 0.990, 0.9931],
        "cosine_ci_high": [0.99999, 0.9940, 0.9955],
        "top1_agreement": [1.0, 0.96, 0.97], "top1_agreement_ci_low": [1.0, 0.93, 0.94],
        "top1_agreement_ci_high": [1.0, 0.98, 0.99],
        "sqnr_db": [70.1, 18.2, 20.3],
    })
    x = rng.normal(0, 1, 20000)
    counts, edges = np.histogram(x, bins=80)
    hist = HistogramView(tensor=layer_name + "_out", edges=tuple(edges.tolist()), counts=tuple(counts.tolist()),
                         ranges={"minmax": (float(x.min()), float(x.max())), "entropy": (-2.9, 2.9),
                                 "percentile": (-3.5, 3.5)},
                         clipped={"minmax": 0.0, "entropy": 0.004, "percentile": 0.0005},
                         zeroed={"minmax": 0.61, "entropy": 0.05, "percentile": 0.12},
                         sqnr_db={"minmax": 31.2, "entropy": 24.5, "percentile": float("nan")})
    trajectory = pd.DataFrame({
        "step": [0, 1, 2, 3], "action": ["all int8", "pin top 4", "pin top 2", "top 2 to fp16"],
        "metric": [0.9921, 0.9975, 0.9958, 0.9957], "ci_low": [0.990, 0.9968, 0.9951, 0.9950],
        "ci_high": [0.994, 0.9981, 0.9964, 0.9963], "int8_fraction": [1.0, 0.8, 0.9, 0.9],
        "meets": [False, True, True, True],
    })
    plan = pd.DataFrame({"group": layers, "nodes": layers, "precision": ["fp16", "int8", "int8", "int8", "int8"]})
    sens = pd.DataFrame({"rank": [1, 2], "group": [layer_name, "dw_conv"], "local_sqnr_db": [12.0, 19.5]})
    return ReportInputs(
        title=title,
        model={"name": "test.onnx", "sha256": "ab" * 32, "inputs": [f"{EVIL}: float32[N,3,16,16]"]},
        end_to_end=e2e,
        per_layer=per_layer,
        verdict=Verdict(threshold="cosine>=0.995", candidate="int8-search", metric="cosine", op=">=",
                        target=0.995, value=0.9957, passed=True, ci_low=0.9952, ci_high=0.9963),
        candidates={"fp16": "every layer FP16", "int8-minmax": "INT8, minmax ranges"},
        histograms=(hist,),
        sensitivity=sens,
        trajectory=trajectory,
        trajectory_metric="cosine",
        plan=plan,
        environment={"python": "3.11", "onnxruntime": "1.32.0"},
        reproducibility={"seed": 0, "command": f"quantlab run {EVIL}.toml", "settings": {"calibrators": ["minmax"]}},
        notes=(f"calibration and validation share 0 samples; tensor {EVIL} had 3 non-finite values",),
    )


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.srcs: list[str] = []
        self.hrefs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        d = dict(attrs)
        if d.get("src"):
            self.srcs.append(d["src"] or "")
        if d.get("href"):
            self.hrefs.append(d["href"] or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(page: str) -> _Collector:
    c = _Collector()
    c.feed(page)
    return c


def test_model_strings_are_escaped_and_render_as_text() -> None:
    page = render_report(sample_inputs(layer_name=EVIL))
    parsed = _parse(page)
    assert "script" not in parsed.tags  # no element was injected
    assert EVIL not in page  # the raw string never appears ...
    assert html.escape(EVIL) in page  # ... only its escaped text
    assert EVIL in "".join(parsed.text)  # which a browser shows as the literal name


def test_report_is_self_contained() -> None:
    page = render_report(sample_inputs())
    parsed = _parse(page)
    assert parsed.srcs and all(s.startswith("data:image/png;base64,") for s in parsed.srcs)
    assert all(h.startswith("#") for h in parsed.hrefs)  # only in-page anchors
    assert not re.search(r"https?://", page)
    assert "<link" not in page and "<script" not in page
    for src in parsed.srcs:  # every embedded image is a real PNG
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for section in ("verdict", "end-to-end", "per-layer", "histograms", "sensitivity", "search", "plan",
                    "environment"):
        assert f'id="{section}"' in page
    assert "PASS" in page and "0.9957" in page and "0.995 [0.9931, 0.9955]" not in page
    assert "0.9943 [0.9931, 0.9955]" in page  # value with its confidence interval


def test_verdict_flags_a_confidence_interval_that_straddles_the_threshold() -> None:
    base = sample_inputs()
    sure = render_report(base)
    assert "could go either way" not in sure
    unsure = render_report(ReportInputs(**{**base.__dict__, "verdict": Verdict(
        threshold="cosine>=0.995", candidate="x", metric="cosine", op=">=", target=0.995, value=0.9952,
        passed=True, ci_low=0.9940, ci_high=0.9960)}))
    assert "could go either way" in unsure


def test_worst_layers_are_named_by_local_error() -> None:
    inputs = sample_inputs()
    page = render_report(inputs)
    per = inputs.per_layer
    for cand, g in per.groupby("candidate"):
        worst = g.sort_values("local").iloc[0]["layer"]
        section = page.split('id="per-layer"')[1].split("</ul>")[0]
        assert f"<b>{cand}</b>: <code>{worst}</code>" in section


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    inputs = sample_inputs(layer_name=EVIL)
    save_report_inputs(tmp_path, inputs)
    assert (tmp_path / "per_layer.parquet").is_file() and (tmp_path / "per_layer.csv").is_file()
    back = load_report_inputs(tmp_path)
    pd.testing.assert_frame_equal(back.per_layer, inputs.per_layer)
    pd.testing.assert_frame_equal(back.end_to_end, inputs.end_to_end)
    assert back.verdict == inputs.verdict
    assert back.histograms[0].ranges == inputs.histograms[0].ranges
    assert back.histograms[0].zeroed == inputs.histograms[0].zeroed
    sqnr = back.histograms[0].sqnr_db  # an unknown prediction (nan) is null in the JSON and nan again on read
    assert sqnr["minmax"] == 31.2 and sqnr["entropy"] == 24.5 and math.isnan(sqnr["percentile"])
    assert render_report(back) == render_report(inputs)
    assert "zeroed %" in render_report(back) and "SQNR dB (predicted)" in render_report(back)
    assert "NaN" not in (tmp_path / "report_inputs.json").read_text()


def test_comparison_shows_what_changed_and_what_moved() -> None:
    a = sample_inputs(title="run-a")
    b_e2e = a.end_to_end.copy()
    b_e2e.loc[b_e2e["candidate"] == "int8-entropy", "cosine"] = 0.9990
    b_plan = a.plan.copy()
    b_plan.loc[0, "precision"] = "int8"
    b = ReportInputs(**{**a.__dict__, "title": "run-b", "end_to_end": b_e2e, "plan": b_plan,
                        "reproducibility": {**a.reproducibility, "seed": 7}})
    page = render_comparison(a, b, label_a="reports/a", label_b="reports/b")
    assert "seed" in page and ">7<" in page
    assert "0.9990" in page or "0.999" in page
    assert "0.004700" in page or "0.0047" in page  # Δ of entropy cosine: 0.9990 - 0.9943
    plan_part = page.split('id="plan"')[1]
    assert "stem_conv" in plan_part and "fp16" in plan_part
    assert "different models" not in page
    other = ReportInputs(**{**b.__dict__, "model": {**b.model, "sha256": "f" * 64}})  # another model: a caveat
    assert "A and B are experiments on different models" in render_comparison(a, other)


def test_write_report_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = write_report(tmp_path, sample_inputs())
    assert path == tmp_path / "index.html"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html", "plots"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["histograms.png", "per_layer.png",
                                                                       "trajectory.png"]


# --------------------------------------------------------------------------- real browser

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                None)


def chromium_open(page: Path, out_dir: Path, *, dump_dom: bool = False, width: int = 1200,
                  height: int = 3000) -> subprocess.CompletedProcess[str]:
    """Open ``page`` from disk in headless Chromium: a screenshot (or the DOM) and its console log."""
    assert CHROMIUM is not None
    args = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
        "--hide-scrollbars", f"--user-data-dir={out_dir / 'profile'}", "--enable-logging=stderr", "--v=0",
        f"--window-size={width},{height}",
    ]
    args += ["--dump-dom"] if dump_dom else [f"--screenshot={out_dir / 'screenshot.png'}"]
    return subprocess.run(args + [page.resolve().as_uri()], capture_output=True, text=True, timeout=120)


def console_problems(stderr: str) -> list[str]:
    """Lines of Chromium's log that report a page problem: console errors, CSP refusals, failed loads."""
    bad = re.compile(r"CONSOLE|Refused to|Uncaught|net::ERR_|Failed to load", re.I)
    return [line for line in stderr.splitlines() if bad.search(line)]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium); "
                                             "CI installs it")
def test_report_opens_in_headless_chromium(tmp_path: Path) -> None:
    path = write_report(tmp_path / "report", sample_inputs(layer_name=EVIL))
    shot = chromium_open(path, tmp_path)
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert not console_problems(shot.stderr), console_problems(shot.stderr)
    png = (tmp_path / "screenshot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    dom = chromium_open(path, tmp_path, dump_dom=True)
    assert dom.returncode == 0
    assert "<script>alert" not in dom.stdout  # the browser built no script element
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom.stdout  # it shows the name as text
    assert dom.stdout.count("<img") == 3  # per-layer, histograms, trajectory
    assert not console_problems(dom.stderr)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_console_check_catches_a_broken_page(tmp_path: Path) -> None:
    """Positive control: the log check above would see a script error if a report had one."""
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><script>throw new Error("broken")</script></body></html>')
    result = chromium_open(bad, tmp_path)
    assert any("broken" in line for line in console_problems(result.stderr))


def test_changed_samples_lists_what_a_candidate_decided_otherwise(tmp_path: Path) -> None:
    """From a real comparison: every sample whose top-1 flipped is counted, the listed ones say which class
    became which, a file-supplied key is escaped, and the table survives save/load."""
    import dataclasses

    import models

    from quantlab.calibrate import calibrate
    from quantlab.compare import CompareOptions, compare
    from quantlab.data import from_arrays
    from quantlab.graph import model_from_proto
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, write_model
    from quantlab.report.samples import changed_samples

    model = model_from_proto(models.any_size_classifier(classes=64))
    rng = np.random.default_rng(1)
    images = (rng.normal(0, 1, (40, 3, 12, 12)) + rng.normal(0, 1.5, (40, 3, 1, 1))).astype(np.float32)
    narrow = from_arrays({"image": images[:16] * 0.3})  # ranges too narrow: the INT8 candidate flips some top-1s
    written = write_model(model, uniform_plan("int8"), calibrate(model, narrow, "minmax").tables["minmax"],
                          WriteOptions(target="tensorrt"))
    result = compare(model, {"int8": written}, from_arrays({"image": images}, role="validation"),
                     CompareOptions(batch_size=8, bootstrap=0, local=False))
    per_sample = result.per_sample.copy()
    flipped = per_sample[~per_sample["top1_agree"].astype(bool)]
    assert 1 <= len(flipped) < 40, "the checks below need some flips, not all"
    per_sample["key"] = "<script>alert(1)</script>" + per_sample["key"].astype(str)
    table = changed_samples(per_sample, shown=3)
    assert len(table) == min(3, len(flipped)) and set(table["changed"]) == {len(flipped)}
    row = table.iloc[0]
    ref, cand = flipped.set_index("sample").loc[row["sample"], ["ref_top1_class", "top1_class"]]
    assert row["change"] == f"top-1 {int(ref)} -> {int(cand)}" and ref != cand
    assert list(table["cosine"]) == sorted(table["cosine"])  # the furthest first
    assert table["cosine"].iloc[0] == flipped["cosine"].min()
    inputs = dataclasses.replace(sample_inputs(), changed_samples=table)
    page = render_report(inputs)
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    save_report_inputs(tmp_path, inputs)
    assert load_report_inputs(tmp_path).changed_samples["change"].tolist() == table["change"].tolist()
    assert changed_samples(per_sample[per_sample["top1_agree"].astype(bool)]).empty


def test_numbers_near_one_keep_their_nines():
    """A cosine of 0.9999996 read "1." in the report (6 places, zeros stripped), and "1. [1., 1.]" with its
    interval: as if the candidate were exact."""
    from quantlab.report.markup import fmt

    assert fmt(0.9999996) == "0.9999996"
    assert fmt(0.995554) == "0.995554" and fmt(0.991) == "0.991" and fmt(0.99) == "0.99"
    assert fmt(0.9999999999) == "1 − 1.0e-10"
    assert fmt(1.0) == "1" and fmt(12.345678) == "12.35"


def test_worst_layers_are_only_layers_with_a_finite_local_figure():
    """Magika's "worst 10 layers" listed 3 culprits, then layers without a local figure in topological order,
    an exact one-hot Cast (+inf dB) 4th."""
    import numpy as np
    import pandas as pd

    from quantlab.report.inputs import worst_layers

    df = pd.DataFrame({"candidate": ["a"] * 5, "layer": ["cast", "conv1", "reshape", "conv2", "fp32_gemm"],
                       "local": [np.inf, 20.0, np.nan, 12.0, np.nan]})
    assert worst_layers(df, True, 10)["layer"].tolist() == ["conv2", "conv1"]
    assert worst_layers(df, True, 1)["layer"].tolist() == ["conv2"]


def test_long_model_names_are_shortened_for_people_and_kept_whole_in_files() -> None:
    """tf2onnx joins a fused node's names with ';' (g2p BERT: 300 characters in one table cell): titles and
    terminal tables show the first name and how many were joined, a long path its start and end."""
    from quantlab.cli.compare import _formatters
    from quantlab.report.markup import CSS, short

    fused = "model/dense_1/MatMul;model/dense_1/BiasAdd;model/dense_1/Relu"
    assert short(fused) == "model/dense_1/MatMul (+2)"
    path = "StatefulPartitionedCall/" + "encoder/" * 10 + "layer_3/attention/MatMul"
    shown = short(path, 48)
    assert len(shown) == 48 and shown.startswith("StatefulPart") and shown.endswith("attention/MatMul")
    assert short("conv1") == "conv1"
    frame = pd.DataFrame({"group": [fused, path], "local_db": [12.5, 30.0]})
    text = frame.to_string(index=False, formatters=_formatters(frame))
    assert "model/dense_1/MatMul (+2)" in text and path not in text and "BiasAdd" not in text
    assert "overflow-wrap: anywhere" in CSS  # the HTML tables keep names whole, wrapped in their cell
    # RegNet: three layers whose names differ only in the middle shortened alike; those are shown whole
    alike = [f"/m/regnet/encoder/stages.{i}/layers.0/layer/layer.2/attention/attention.0/Conv" for i in (1, 2, 3)]
    frame = pd.DataFrame({"layer": alike + [path], "local_db": [1.0, 2.0, 3.0, 4.0]})
    text = frame.to_string(index=False, formatters=_formatters(frame))
    assert all(name in text for name in alike) and path not in text


def test_loop_bodies_calibrated_step_by_step_get_their_section(tmp_path: Path) -> None:
    """A Loop's body ranges (calibration runs it step by step) reach the report: node, tensors, widest range and
    noisiest predicted tensor per method, escaped; and they survive a save/load of the report's inputs."""
    import models

    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays
    from quantlab.graph import model_from_proto
    from quantlab.table import bodies_frame

    model = model_from_proto(models.token_rnn())
    rng = np.random.default_rng(0)
    data = from_arrays({"x": rng.normal(0, 1, (16, 7, 6)).astype(np.float32), "h0": np.zeros((16, 12), np.float32)})
    tables = calibrate(model, data, ["minmax", "entropy"], batch_size=8).tables
    bodies = bodies_frame(tables)
    assert list(bodies["method"]) == ["minmax", "entropy"] and (bodies["tensors"] > 3).all()
    (loop,) = [n.name for n in model.proto.graph.node if n.op_type == "Loop"]
    assert set(bodies["body of"]) == {loop}
    assert render_report(sample_inputs()).count('id="bodies"') == 0  # no body, no section
    evil = bodies.assign(**{"body of": EVIL})
    inputs = ReportInputs(**{**sample_inputs().__dict__, "bodies": evil})
    page = render_report(inputs)
    section = page.split('id="bodies"')[1].split("</section>")[0]
    assert "Loop and Scan bodies" in page and "--int8-bodies" in section and html.escape(EVIL) in section
    assert EVIL not in page and str(bodies["widest"].iloc[0]) in section
    save_report_inputs(tmp_path, inputs)
    back = load_report_inputs(tmp_path)
    pd.testing.assert_frame_equal(back.bodies, inputs.bodies)
    assert render_report(back) == page


def test_no_changed_text_is_not_told_as_no_changed_decision_when_positions_moved() -> None:
    """ddddocr with ctc_blank: INT8 agreed on every line's text but on 91.7 % of the lines at every position, and the
    report said "No candidate changed a decision on any validation sample"."""
    import dataclasses

    from quantlab.report.sections import changed_samples_section

    base = sample_inputs()
    e2e = base.end_to_end.assign(text_agreement=100.0, sequence_agreement=91.7)
    empty = pd.DataFrame(columns=["candidate", "output", "sample", "key", "change", "changed", "cosine"])
    text = changed_samples_section(dataclasses.replace(base, end_to_end=e2e, changed_samples=empty), {})
    assert "No candidate changed the text" in text and "without changing the text" in text
    plain = changed_samples_section(dataclasses.replace(base, changed_samples=empty), {})
    assert "No candidate changed a decision on any validation sample" in plain


def test_sensitivity_section_says_which_ranking_it_shows():
    """A weak reverted-alone ranking is replaced by the isolated one: the section must not describe the table
    as what reverting each group alone bought."""
    from quantlab.report.sections import sensitivity_section

    reverted = pd.DataFrame({"rank": [1, 2], "group": ["a", "b"], "impact_db": [1.2, 0.3]})
    isolated = reverted.assign(impact_db=[-2.0, -0.5], isolated_sqnr_db=[15.2, 19.0])
    plain = sensitivity_section(dataclasses.replace(sample_inputs(), sensitivity=reverted))
    weak = sensitivity_section(dataclasses.replace(sample_inputs(), sensitivity=isolated))
    assert "reverting them alone improves" in plain and "only INT8 group" not in plain
    assert "only INT8 group" in weak and "reverting them alone improves" not in weak
    assert "19.0" in weak or "19" in weak


def test_an_isolated_rankings_rows_name_the_one_int8_group():
    """A rank-isolated row pins every group but one: the table names that one instead of listing the rest."""
    from quantlab.report.sections import _trajectory_view

    t = pd.DataFrame({"step": [1, 2], "phase": ["rank", "rank-isolated"], "pinned": ["a", "a,b,d"],
                      "pins": ["a=fp16", "a=fp16,b=fp16,d=fp16"], "only_int8": ["", "c"], "plan_hash": ["x", "y"]})
    view = _trajectory_view(t)
    assert list(view["pinned"]) == ["a", "all but c"] and "only_int8" not in view.columns
