"""A short run read back through a real TensorBoard server's HTTP API, and the ways to use a checkpoint."""

import contextlib
import csv
import functools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from conftest import ROOT, TINY, free_port, last, result

from dynnet.cli import main
from dynnet.cli.predictions import export_main

COEFFICIENTS = [f"weights/{name}" for name in "abcde"]


def compare_tags(a: str, b: str, breaks: str) -> int:
    """TensorBoard's compareTagNames, the order of its tag lists: character by character, by character code (so
    case-sensitive: "Z" < "a"), a character of ``breaks`` or a digit before any other, and a run of digits against
    another by its value (TensorBoard also reads decimals and exponents there, which no dynnet tag has)."""

    def digit(c: str) -> bool:
        return "0" <= c <= "9"

    i = j = 0
    while i < len(a) and j < len(b):
        if digit(a[i]) and digit(b[j]):
            start_a, start_b = i, j
            while i < len(a) and digit(a[i]):
                i += 1
            while j < len(b) and digit(b[j]):
                j += 1
            if int(a[start_a:i]) != int(b[start_b:j]):
                return -1 if int(a[start_a:i]) < int(b[start_b:j]) else 1
            continue
        first_a, first_b = a[i] in breaks or digit(a[i]), b[j] in breaks or digit(b[j])
        if first_a != first_b:
            return -1 if first_a else 1
        if not first_a and a[i] != b[j]:  # two break characters count as equal
            return -1 if a[i] < b[j] else 1
        i, j = i + 1, j + 1
    return (i < len(a)) - (j < len(b))


def opened_groups(tags, breaks: str) -> dict[str, list[str]]:
    """The tag groups TensorBoard opens, with their charts in order. The Scalars tab (the tf-scalar-dashboard, with
    tf-categorization-utils; breaks "/_") and the Time Series tab (the metrics store; breaks "/") both sort the tags,
    group them by what comes before the first "/" in that order, and open the first two groups only
    (tensorboard/webfiles.zip, index.js: ``_shouldOpen(index) <= 2``, index 0 being the tag filter's results;
    ``tagGroupExpanded`` set for ``groups.slice(0, 2)``)."""
    groups: dict[str, list[str]] = {}
    for tag in sorted(tags, key=functools.cmp_to_key(lambda a, b: compare_tags(a, b, breaks))):
        groups.setdefault(tag.split("/", 1)[0], []).append(tag)
    return dict(list(groups.items())[:2])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 200-step fit logging every 20 steps, validated at steps 100 and 200."""
    root = tmp_path_factory.mktemp("run")
    main(["fit", "-c", str(ROOT / "configs" / "default.yaml"), *TINY, "--trainer.default_root_dir", str(root)])
    return root


@contextlib.contextmanager
def serve(logdir, *flags: str):
    """A TensorBoard server on logdir, as a function that GETs a path of its HTTP API (or POSTs ``body``)."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
         "--port", str(port), "--reload_interval", "1", *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def get(path: str, body: dict | None = None, **query):
        url = f"{base}{path}?{urllib.parse.urlencode(query)}" if query else f"{base}{path}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    try:
        deadline = time.monotonic() + 90
        while True:  # until the server answers and has loaded the run's scalars
            try:
                if get("/data/plugin/scalars/tags").get("version_0", {}).get("val/expected_loss"):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "TensorBoard did not serve the run within 90 s"
            time.sleep(0.5)
        yield get
    finally:
        os.kill(server.pid, signal.SIGTERM)  # the server this function started, by its own process id
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def tensorboard(run):
    with serve(run / "lightning_logs", "--load_fast", "false") as get:
        yield get


def test_tensorboard_serves_the_whole_story(tensorboard):
    scalars = tensorboard("/data/plugin/scalars/tags")["version_0"]
    for tag in ["train/loss", "train/lr", "val/expected_loss", "val/optimality_gap", *COEFFICIENTS,
                "with_degree/3", "with_degree/4", "with_degree/5"]:  # fmt: skip
        assert tag in scalars, tag
    points = tensorboard("/data/plugin/scalars/scalars", run="version_0", tag="train/loss")
    assert [step for _, step, _ in points] == list(range(20, 201, 20))  # one point per logging interval
    gaps = tensorboard("/data/plugin/scalars/scalars", run="version_0", tag="val/optimality_gap")
    assert [step for _, step, _ in gaps] == [100, 200]
    images = tensorboard("/data/plugin/images/tags")["version_0"]
    assert "val/fit" in images
    assert len(tensorboard("/data/plugin/images/images", run="version_0", tag="val/fit")) == 2
    assert "result/text_summary" in tensorboard("/data/plugin/text/tags")["version_0"]


@pytest.mark.parametrize("tab, breaks", [("scalars", "/_"), ("timeseries", "/")])
def test_tensorboard_opens_on_the_loss_and_the_gap(tensorboard, tab, breaks):
    # The rule as ported puts the coefficients and degrees first under the names they had (coef/, degree/), as
    # TensorBoard did.
    assert list(opened_groups(["coef/a", "degree/3", "train/loss", "val/optimality_gap"], breaks)) == ["coef", "degree"]
    tags = list(tensorboard("/data/plugin/scalars/tags")["version_0"])
    if tab == "timeseries":  # which shows the pictures among the scalars
        tags += list(tensorboard("/data/plugin/images/tags")["version_0"])
    opened = opened_groups(tags, breaks)
    assert opened == {
        "train": ["train/loss", "train/lr"],
        "val": ["val/expected_loss", *(["val/fit"] if tab == "timeseries" else []), "val/log10_expected_loss",
                "val/log10_gap", "val/optimality_gap"],
    }  # fmt: skip


def test_hparams_lists_the_tuned_settings_first(tensorboard):
    # TensorBoard's dashboard ticks the first five settings the server lists: those marked as differing.
    experiment = tensorboard("/data/plugin/hparams/experiment", body={"experimentName": ""})
    first = [(info["name"], info["differs"]) for info in experiment["hparamInfos"][:6]]
    tuned = ["optimizer", "optimizer.lr", "optimizer.momentum", "seed_everything", "trainer.max_steps"]
    assert first == [*((name, True) for name in tuned), ("data.high", False)]
    types = {info["name"]: info["type"] for info in experiment["hparamInfos"]}
    assert types["seed_everything"] == types["model.min_degree"] == "DATA_TYPE_FLOAT64"
    assert [metric["name"]["tag"] for metric in experiment["metricInfos"]] == [
        "val/expected_loss",
        "val/optimality_gap",
    ]
    groups = tensorboard(
        "/data/plugin/hparams/session_groups",
        body={"experimentName": "", "allowedStatuses": ["STATUS_SUCCESS"], "colParams": [], "startIndex": 0,
              "sliceSize": 10},
    )  # fmt: skip
    (group,) = groups["sessionGroups"]
    assert group["hparams"]["seed_everything"] == 3 and group["hparams"]["optimizer"] == "SGD"
    final = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
    gaps = tensorboard("/data/plugin/scalars/scalars", run="version_0", tag="val/optimality_gap")
    assert final["val/optimality_gap"] == pytest.approx(gaps[-1][2])


@pytest.mark.slow
def test_the_readme_flag_shows_every_fit_image(tmp_path):
    # Twelve validations: TensorBoard keeps ten pictures of a tag unless told to keep more.
    main(["fit", "-c", str(ROOT / "configs" / "default.yaml"), *TINY, "--trainer.max_steps", "1200",
          "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    with serve(tmp_path / "lightning_logs", "--samples_per_plugin", "images=1000") as get:  # its default loader
        images = get("/data/plugin/images/images", run="version_0", tag="val/fit")
    assert [image["step"] for image in images] == list(range(100, 1201, 100))


def test_predict_writes_a_csv(run, tmp_path, capsys):
    output = tmp_path / "out" / "predictions.csv"
    main(["predict", "--ckpt_path", str(last(run)), "--predictions.path", str(output),
          "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    assert f"Predictions: {output}" in capsys.readouterr().out
    rows = list(csv.DictReader(output.open()))
    assert len(rows) == 2000
    assert list(rows[0]) == ["x", "target", "degree_3", "degree_4", "degree_5", "expected"]
    row = rows[1234]
    mean = sum(float(row[f"degree_{k}"]) for k in (3, 4, 5)) / 3
    assert float(row["expected"]) == pytest.approx(mean, rel=1e-5)


def test_test_and_validate_report_the_gap(run, tmp_path, capsys):
    for subcommand, stage in (("test", "test"), ("validate", "val")):
        main([subcommand, "--ckpt_path", str(last(run)), "--trainer.default_root_dir",
              str(tmp_path)])  # fmt: skip
        out = capsys.readouterr().out
        assert f"{stage}/expected_loss" in out and f"{stage}/optimality_gap" in out


def test_export_gives_the_polynomial(run, tmp_path, capsys):
    output = tmp_path / "polynomial.json"
    export_main([str(last(run)), "-o", str(output)])
    polynomial = json.loads(output.read_text())
    assert polynomial["powers"]["e"] == [4, 5]
    assert list(polynomial["coefficients"].values()) == result(polynomial["result"])


def test_export_refuses_a_bad_checkpoint(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=f"dynnet-export: error: checkpoint {bad} is unreadable"):
        export_main([str(bad)])


@pytest.mark.slow
def test_print_config_round_trips(tmp_path):
    printed = subprocess.run(
        [sys.executable, "-m", "dynnet", "fit", "-c", str(ROOT / "configs" / "fast.yaml"), "--print_config"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    config = tmp_path / "edited.yaml"
    config.write_text(printed.replace("max_steps: 3000", "max_steps: 50"))
    out = subprocess.run(
        [sys.executable, "-m", "dynnet", "fit", "-c", str(config), "--trainer.default_root_dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Trained 50 steps" in out.stdout


@pytest.mark.slow
def test_help_documents_every_option():
    out = subprocess.run([sys.executable, "-m", "dynnet", "fit", "--help"], capture_output=True, text=True).stdout
    for option, words in [
        ("--model.min_degree", "Lowest degree drawn"),
        ("--model.max_degree", "Highest degree drawn"),
        ("--data.n_points", "How many points"),
        ("--data.low", "Left end"),
        ("--data.high", "Right end"),
        ("--data.steps_per_epoch", "Optimizer steps in one epoch"),
        ("--data.steps_per_batch", "Optimizer steps in each train batch"),
        ("--predictions.path", "The CSV file to write"),
    ]:
        assert option in out and words in out, option
