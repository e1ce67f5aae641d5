"""bench/torch_bench.py rewrites only its own section of docs/BENCHMARKS.md.
(The benchmark itself needs a GPU; this checks the part that edits the doc,
and that the script imports without torch.)"""

import importlib.util
import os
import sys

from conftest import REPO

spec = importlib.util.spec_from_file_location(
    "torch_bench", os.path.join(REPO, "bench", "torch_bench.py")
)
tb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tb)

H = tb.HEADING


def test_imports_without_torch():
    assert "torch" not in sys.modules


def test_replaces_only_its_section():
    text = f"# B\n\n## A\n\nkeep a\n\n{H}\n\nold\nold table\n\n## C\n\nkeep c\n"
    out = tb.replace_section(text, H, "new body")
    assert out == f"# B\n\n## A\n\nkeep a\n\n{H}\n\nnew body\n\n## C\n\nkeep c\n"
    assert tb.replace_section(out, H, "new body") == out  # idempotent


def test_last_section_and_missing_section():
    text = f"# B\n\n## A\n\nkeep\n\n{H}\n\nold\n"
    assert tb.replace_section(text, H, "x") == f"# B\n\n## A\n\nkeep\n\n{H}\n\nx\n"
    assert tb.replace_section("# B\n\nintro\n", H, "x") == f"# B\n\nintro\n\n{H}\n\nx\n"


def test_real_doc_keeps_other_sections():
    with open(os.path.join(REPO, "docs", "BENCHMARKS.md"), encoding="utf-8") as f:
        text = f.read()
    out = tb.replace_section(text, H, "| a | b |")
    before, _, _ = text.partition(H)
    assert out.startswith(before) and out.count(H) == 1 and "| a | b |" in out


def test_table_ratios():
    rows = [
        {"mode": "native", "alloc_us": 2.0, "step_ms_median": 100.0,
         "peak_reserved": 1000 * tb.MiB, "peak_allocated": 800 * tb.MiB},
        {"mode": "cudalloc", "alloc_us": 1.0, "step_ms_median": 80.0, "step_ms_mean": 90.5,
         "peak_reserved": 850 * tb.MiB, "peak_allocated": 800 * tb.MiB},
        {"mode": "rmm", "error": "boom"},
        {"mode": "cudalloc", "alloc_us": None, "step_ms_median": 100.0,
         "peak_reserved": None, "peak_allocated": None},
    ]
    t = tb.table(rows).splitlines()
    assert "| cudalloc | 1.00 | 80.0 | 1.25× | 90.5 | 850 | 0.85× | 800 |" in t
    assert "| native | 2.00 | 100.0 | 1.00× | n/a | 1,000 | 1.00× | 800 |" in t
    assert t[-2].startswith("| rmm | failed: boom")
    # --alloc-iters 0 (the training loop alone), and an allocator without peaks.
    assert t[-1] == "| cudalloc | n/a | 100.0 | 1.00× | n/a | n/a | n/a | n/a |"


def test_a_run_that_measures_nothing_leaves_the_doc_alone(tmp_path):
    # A torch that cannot be imported (also where a real one is installed):
    # every worker fails, so there is nothing to write.
    from conftest import child_env, run_py

    (tmp_path / "torch.py").write_text("raise ImportError('no torch here')\n")
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"# B\n\n{H}\n\nearlier figures\n", encoding="utf-8")
    r = run_py(
        args=[os.path.join(REPO, "bench", "torch_bench.py"), "--modes", "native", "--doc", str(doc)],
        env=child_env(extra_path=[str(tmp_path)]),
    )
    assert r.returncode == 1, r.stderr
    assert "left unchanged" in r.stderr
    assert doc.read_text(encoding="utf-8") == f"# B\n\n{H}\n\nearlier figures\n"
