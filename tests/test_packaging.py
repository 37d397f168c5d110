"""The release: ``python -m build`` makes an sdist and a wheel that ``twine check`` passes; the wheel,
installed into a fresh virtual environment outside the checkout, runs ``rtrl-jax``; one version;
``py.typed`` shipped; the command line stops quietly on a closed pipe."""

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import rtrl_jax

ROOT = Path(__file__).resolve().parents[1]
CLI = "import sys; from rtrl_jax.cli import main; sys.exit(main())"


def _closed_pipe(command: list[str], **kwargs) -> tuple[int, str]:
    """Runs ``command`` with its stdout a pipe closed by the reader before anything is written (so
    the write fails with EPIPE); its status and stderr."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    return process.wait(timeout=300), stderr


def test_closed_pipe_ends_the_command_quietly():
    status, stderr = _closed_pipe([sys.executable, "-c", CLI, "config"])
    assert (status, stderr) == (141, "")


def test_one_version():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert (ROOT / "rtrl_jax" / "py.typed").is_file()
    assert rtrl_jax.__version__.count(".") == 2


def _run(args, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)])
    return out


@pytest.mark.slow  # builds the sdist and the wheel (about 20 s)
def test_build_makes_sdist_and_wheel_that_twine_accepts(dist):
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert [p.name for p in wheels] == [f"rtrl_jax-{rtrl_jax.__version__}-py3-none-any.whl"]
    assert [p.name for p in sdists] == [f"rtrl_jax-{rtrl_jax.__version__}.tar.gz"]
    out = _run([sys.executable, "-m", "twine", "check", "--strict", *map(str, wheels + sdists)])
    assert out.count("PASSED") == 2


@pytest.mark.slow  # a fresh virtual environment with the wheel and its dependencies (minutes)
def test_wheel_installed_outside_the_checkout_runs_the_cli(dist, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python, cli = env_dir / "bin" / "python", env_dir / "bin" / "rtrl-jax"
    (wheel,) = dist.glob("*.whl")
    _run([str(python), "-m", "pip", "install", "-q", str(wheel)])
    work = tmp_path / "work"  # outside the checkout: nothing can be imported from it
    work.mkdir()
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment["JAX_PLATFORMS"] = "cpu"

    location = _run(
        [str(python), "-c", "import rtrl_jax, pathlib; print(pathlib.Path(rtrl_jax.__file__).parent)"],
        cwd=work,
        env=environment,
    ).strip()
    assert Path(location).is_relative_to(env_dir), location
    assert (Path(location) / "py.typed").is_file()
    version = _run(
        [str(python), "-c", "import rtrl_jax; print(rtrl_jax.__version__)"], cwd=work, env=environment
    )
    assert version.strip() == rtrl_jax.__version__

    listing = _run([str(cli), "estimators"], cwd=work, env=environment)
    assert all(f"{info.name} " in listing for info in rtrl_jax.registered())
    assert _closed_pipe([str(cli), "estimators"], cwd=work, env=environment) == (141, "")

    overrides = ["train.steps=40", "train.chunk_size=20", "train.checkpoint_every=20", "train.batch_size=2"]
    _run([str(cli), "train", *overrides, "--out", "run", "--quiet"], cwd=work, env=environment)
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 40, summary
    assert summary["task"].startswith("copy") and summary["estimator"] == "rtrl"  # the embedded default
