from conftest import ROOT


def test_ci_runs_the_readme_test_command_as_written():
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command.endswith("python -m pytest")
    assert f"```bash\n{command}\n```" in (ROOT / "README.md").read_text()


def test_readme_quick_start_trains_the_default_config():
    assert "&& .venv/bin/dynnet fit -c configs/default.yaml\n" in (ROOT / "README.md").read_text()
