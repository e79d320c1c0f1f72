"""The report: model table, plots, and the scalability / sustainability sections."""

from dipo_scale.report import write_report


def test_report_with_scalability_and_sustainability_sections(tmp_path):
    models = {"target": {"verbmem_f": 90.0, "knowmem_f": 80.0, "knowmem_r": 70.0},
              "dipo": {"verbmem_f": 10.0, "knowmem_f": 5.0, "knowmem_r": 68.0, "privleak": -3.5}}
    scal = [{"forget_size": n, "knowmem_f": f, "knowmem_r": r}
            for n, f, r in ((100, 4.0, 69.0), (200, 6.0, 66.0), (400, 9.0, 61.0))]
    sust = [{"request": i, "knowmem_f": f, "knowmem_r": r} for i, f, r in ((1, 3.0, 68.0), (2, 5.0, 64.0))]
    write_report(tmp_path, models, "t", ["a note"],
                 series={"Scalability": ("forget_size", scal), "Sustainability": ("request", sust)})
    text = (tmp_path / "report.md").read_text()
    assert "## Scalability" in text and "## Sustainability" in text and "- a note" in text
    assert "forget_size = 400" in text and "request = 2" in text
    assert "| dipo |" in text
    for png in ("scalability.png", "sustainability.png", "tradeoff.png", "criteria.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind
