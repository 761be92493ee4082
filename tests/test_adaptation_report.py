"""The adaptation job's report: loss curves, slice grids, overlays and the escaped index page."""

from __future__ import annotations

import torch

from pipelines.adaptation import report

PNG = b"\x89PNG\r\n\x1a\n"


def test_figures_are_pngs_and_no_losses_draw_nothing(tmp_path):
    rows = [{"step": i, "loss": 1.0 / (i + 1), "loss_rec": 0.5} for i in range(60)]
    assert report.loss_plot(tmp_path / "losses.png", rows) == tmp_path / "losses.png"
    assert report.loss_plot(tmp_path / "none.png", [{"step": 1, "acc": 0.5}]) is None and not (tmp_path / "none.png").exists()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    report.image_grid(tmp_path / "grid.png", [[x[0, 0], x[0, 0]], [x[1, 0]]], ["a", "b"], ["image", "reconstruction"], "t")
    labels = torch.randint(0, 3, (3, 16, 16))
    report.overlay_grid(tmp_path / "overlays.png", x, labels, None, ["background", "liver", "kidney"], "t")
    for name in ("losses.png", "grid.png", "overlays.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG) and b"tEXt" not in data, name


def test_index_escapes_values_and_leaves_missing_figures_out(tmp_path):
    (tmp_path / "losses.png").write_bytes(PNG)
    evil = "<script>alert('x')</script>"
    page = report.write_index(
        tmp_path,
        f"Target adaptation job {evil}",
        {"factory": "fac v0001", "classes": evil, "steps": 3},
        [("Losses", "losses.png"), ("Segmentation", "overlays.png")],
        [("Dice on held-out labelled target cases: average", ["class", "mean Dice"], [["liver", "0.812"]])],
    ).read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "&lt;script&gt;" in page
    assert '<tr><th scope="row">steps</th><td>3</td></tr>' in page
    assert '<tr><th scope="row">liver</th><td>0.812</td></tr>' in page
    assert '<img src="losses.png"' in page and "overlays.png" not in page
