"""Without torch the torch-free tests still run and the parity tests skip, one by one (conftest.py);
under CI=true those skips fail the run, so CI cannot pass without the parity tests."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_without_torch(tmp_path, *args) -> subprocess.CompletedProcess:
    """pytest `args` in a child process where `import torch` fails, under CI=true."""
    (tmp_path / "torch.py").write_text('raise ImportError("torch hidden for this test")\n')
    env = dict(os.environ, CI="true", PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_without_torch_the_other_tests_run_and_ci_fails_on_the_skipped_parity_tests(tmp_path):
    out = pytest_without_torch(tmp_path, "tests/test_optim.py")
    # Parameter groups, per-tensor clipping, the EMA and the schedules need no torch; the two
    # AdamW comparisons do, and are the only tests that stop the run.
    summary = re.search(r"(\d+) passed, 2 errors in", out.stdout)
    assert out.returncode == 1 and summary and int(summary.group(1)) >= 3, out.stdout[-3000:]
    assert " failed" not in out.stdout.strip().splitlines()[-1], out.stdout[-3000:]
    stopped = re.findall(r"^ERROR (\S+)", out.stdout, flags=re.MULTILINE)
    assert stopped and all("test_update_rule_matches_torch_adamw" in name for name in stopped), stopped
    assert out.stdout.count("CI=true: a parity test was skipped (Skipped: needs torch") >= 2


def test_without_torch_a_module_that_skips_itself_fails_collection_under_ci(tmp_path):
    """The collection hook: a test module that skips itself for want of torch (an importorskip at
    module level) is an error under CI=true, not a quiet skip."""
    out = pytest_without_torch(tmp_path, "--collect-only", "tests/test_init_from.py")
    assert out.returncode != 0 and "1 error" in out.stdout, out.stdout[-3000:]
    assert "CI=true: a parity test was skipped" in out.stdout, out.stdout[-3000:]
