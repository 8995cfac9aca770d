"""The evaluation report's files: results.json (merged) and results.md."""

import json

from dino_jax.eval import report


def test_write_results_merges_json(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"final_loss": 3.5, "knn_k20_top1": 1.0}))
    json_path, md_path = report.write_results(str(tmp_path), {"knn_k20_top1": 90.0}, "# table")
    payload = json.loads(open(json_path).read())
    assert payload == {"final_loss": 3.5, "knn_k20_top1": 90.0}
    assert open(md_path).read() == "# table\n"


def test_results_json_alone_keeps_the_markdown_and_reads_back(tmp_path):
    (tmp_path / "results.md").write_text("# earlier table\n")
    _, md_path = report.write_results(str(tmp_path), {"train_wall_s": 12})
    assert md_path is None and (tmp_path / "results.md").read_text() == "# earlier table\n"
    assert report.read_results(str(tmp_path)) == {"train_wall_s": 12.0}
    assert report.read_results(str(tmp_path / "none")) == {}
