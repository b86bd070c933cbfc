"""vqtok.bench.revision: a module as of a git revision beside the current one, interleaved timing,
and the benchmarks' --against option."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import vqtok
from vqtok.bench.revision import interleaved, module_at

ROOT = Path(vqtok.__file__).resolve().parents[2]
IN_GIT = shutil.which("git") is not None and subprocess.run(
    ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode == 0
needs_git = pytest.mark.skipif(not IN_GIT, reason="the package is not in a git checkout")


@needs_git
def test_module_at_head_is_a_separate_copy_of_the_committed_file():
    from vqtok.quantizers import health

    old = module_at("HEAD", "vqtok.quantizers.health")
    assert old is not health and old.CodebookHealth is not health.CodebookHealth
    assert old.__name__ == "vqtok.quantizers.health@HEAD" and old.__package__ == "vqtok.quantizers"
    committed = subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:tokenizers/vqtok/quantizers/health.py"],
                               capture_output=True, text=True, check=True).stdout
    assert old.MAX_TRACKED_CODES == health.MAX_TRACKED_CODES and "class CodebookHealth" in committed
    tracker = old.CodebookHealth(16)  # relative imports resolved against the current package
    tracker.update(__import__("torch").arange(16))
    assert int(tracker.histogram.sum()) == 16


@needs_git
def test_module_at_rejects_bad_revisions_and_names():
    with pytest.raises(ValueError, match="git show"):
        module_at("no-such-revision-x", "vqtok.quantizers.health")
    with pytest.raises(ValueError, match="vqtok"):
        module_at("HEAD", "torch.nn")


def test_interleaved_alternates_and_rotates():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert [len(t) for t in times.values()] == [3, 3] and all(x >= 0 for t in times.values() for x in t)
    with pytest.raises(ValueError):
        interleaved({"a": lambda: None}, 0)


@needs_git
@pytest.mark.parametrize("script,args,key", [
    ("benchmarks/bench_codebook_health.py", ["--bits", "6", "--tokens", "32", "--steps", "2"], "against_median_us"),
    ("benchmarks/bench_fsq_entropy.py", ["--levels", "4,3", "--tokens", "16"], "against_median_ms"),
    ("benchmarks/bench_lfq_entropy.py", ["--bits", "6", "--tokens", "16", "--extra", ""], "against_median_ms"),
    ("benchmarks/bench_ssim.py", ["--cases", "2x3x16x16", "--no-skimage"], "against_median_ms"),
])
def test_benchmarks_time_against_a_revision(script, args, key, tmp_path, capsys):
    from scripts import load_script

    mod = load_script(script)
    out = tmp_path / "r.json"
    assert mod.main([*args, "--reps", "3", "--against", "HEAD", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["against"] == "HEAD" and row[key] > 0 and row["ratio"] > 0
    assert "HEAD" in capsys.readouterr().out and "ratio" in mod.table([row])
    with pytest.raises(SystemExit):
        mod.main([*args, "--against", "no-such-revision-x"])
