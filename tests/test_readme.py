import math
import re
import shlex
import subprocess
import sys
from collections import Counter

import pytest
import torch
from conftest import ROOT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dynnet.cli import main

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]  # every page of documentation: the README and the pages it links in docs/
QUICK_START = (
    "python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 -e . && "
    ".venv/bin/dynnet fit -c configs/default.yaml"
)


def page_id(page) -> str:
    return str(page.relative_to(ROOT))


def test_ci_runs_the_readme_test_command_as_written():
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command.endswith("python -m pytest")
    assert f"```bash\n{command}\n```" in README.read_text()


def test_readme_quick_start_trains_the_default_config_after_the_torch_note():
    text = README.read_text()
    assert f"```bash\n{QUICK_START}\n```" in text
    assert 0 <= text.find("**Which torch.**") < text.find(QUICK_START)


def test_readme_is_a_page_a_newcomer_reads_to_the_end():
    # The README is the overview; the details live in docs/, each page one subject.
    assert 200 <= len(README.read_text().splitlines()) < 300
    assert {page.name for page in DOCS} >= {"tensorboard.md", "lightning.md", "runs.md", "sweeps.md", "performance.md"}
    for page in DOCS:
        assert len(page.read_text().splitlines()) < 300, page_id(page)


def bash_commands(page) -> list[str]:
    """Every command in a page's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            command = line.split("  #")[0].strip()
            if command and not command.startswith("#"):
                commands += [part.strip() for part in command.split("&&")]
    return commands


def test_the_pages_have_their_commands():
    assert len(bash_commands(README)) >= 15
    assert sum(len(bash_commands(page)) for page in PAGES) > 20


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_command_uses_the_clones_virtual_environment(page):
    # One way throughout: the virtual environment's programs, from the clone's folder.
    for command in bash_commands(page):
        assert re.match(r"(python3 -m venv \.venv$|(srun )?\.venv/bin/\w)", command), command


def named_files(page) -> set[str]:
    """Every file of the clone a page names by its path from the clone's folder."""
    return set(
        re.findall(
            r"(?<![\w/])((?:configs|scripts|docs|tests|benchmark|dynnet)/[\w./-]*\.(?:yaml|py|png|json|md))",
            page.read_text(),
        )
    )


def test_the_pages_name_their_files():
    assert len(named_files(README)) > 20
    assert len(set().union(*map(named_files, PAGES))) > 40


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_file_a_page_names_exists(page):
    assert [name for name in sorted(named_files(page)) if not (ROOT / name).is_file()] == []


def anchors(page) -> set[str]:
    """The anchors of a page's headings, as GitHub makes them."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def links(page) -> list[str]:
    """Every link and picture a page has, outside code, that is not a web address."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"\w+://", target)]


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_link_resolves(page):
    # A link names a file relative to its page, and a #part names one of the target page's headings.
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_file() or (anchor and anchor not in anchors(file)):
            broken.append(target)
    assert broken == []


def test_the_readme_links_every_docs_page():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(README)}
    assert [page_id(page) for page in DOCS if page not in linked] == []


def test_every_picture_is_shown():
    # The screenshots and the benchmark's plot each appear on the page they belong to.
    shown = {(page.parent / target).resolve() for page in PAGES for target in links(page) if target.endswith(".png")}
    pictures = [*(ROOT / "docs").glob("*.png"), *(ROOT / "benchmark").glob("*.png")]
    assert pictures and [str(p.relative_to(ROOT)) for p in sorted(pictures) if p.resolve() not in shown] == []


def test_the_readme_shows_the_sweep_config_as_it_is():
    text = README.read_text()
    assert f"```yaml\n{(ROOT / 'configs' / 'sweep.yaml').read_text()}```" in text


def table_rows(text: str) -> list[str]:
    """The body rows of a page's tables (the rows below each header)."""
    return [row for table in re.findall(r"^\|[-|]+\|\n((?:\|.*\n?)+)", text, re.M) for row in table.splitlines()]


def test_no_table_row_or_percentage_is_stated_twice():
    # Each figure has one place: a table row, or a percentage, found on two pages (or twice on one) is a copy.
    rows, percentages = Counter(), Counter()
    for page in PAGES:
        text = page.read_text()
        rows.update(table_rows(text))
        percentages.update(re.findall(r"\d[\d.]*%", text))
    assert len(rows) > 50
    assert {row: n for row, n in rows.items() if n > 1} == {}
    assert {figure: n for figure, n in percentages.items() if n > 1} == {}


def flag_examples() -> list[str]:
    """Every backquoted example in the flag table, on whichever page it is."""
    header = "| to change | flag |"
    [table] = [page.read_text().split(header)[1] for page in PAGES if header in page.read_text()]
    rows = table.split("\n\n")[0].splitlines()[2:]
    return [example for row in rows for example in re.findall(r"`(--[^`]+)`", row.split("|")[2])]


def test_the_flag_table_has_its_examples():
    assert len(flag_examples()) >= 14


NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.slow
@pytest.mark.parametrize(
    "example", [pytest.param(example, marks=NEEDS_GPU if "gpu" in example else ()) for example in flag_examples()]
)
def test_every_flag_example_trains(tmp_path, monkeypatch, example):
    args = ["fit", "-c", str(ROOT / "configs" / "default.yaml"), *shlex.split(example), "--trainer.max_steps", "600",
            "--data.steps_per_epoch", "200", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    if "--trainer.default_root_dir" in example:
        args[args.index("--trainer.default_root_dir") + 1] = str(tmp_path / "runs")
    else:
        args += ["--trainer.default_root_dir", str(tmp_path / "runs")]
    monkeypatch.chdir(tmp_path)
    if "ddp" in example:  # Lightning starts the other process by running the command again: a real command
        run = subprocess.run([sys.executable, "-m", "dynnet", *args], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
    else:
        main(args)
    [folder] = (tmp_path / "runs" / "lightning_logs").iterdir()
    losses = [e.value for e in EventAccumulator(str(folder)).Reload().Scalars("val/expected_loss")]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
