"""Progress fit for files: one line per log interval (or every 30 s) when the output is not a terminal."""

import io

from conftest import tiny_args
from tqdm.auto import tqdm

from ebdiff import progress
from ebdiff.cli import main


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_bars_in_a_terminal_lines_elsewhere(monkeypatch):
    monkeypatch.delenv("EBDIFF_PROGRESS", raising=False)
    bar = progress.progress_bar(total=3, file=Tty())
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress.progress_bar(total=3, file=io.StringIO()), progress.LineProgress)
    assert isinstance(progress.progress_bar(total=3, file=io.StringIO(), disable=True), tqdm)  # silent either way
    monkeypatch.setenv("EBDIFF_PROGRESS", "bars")
    assert isinstance(progress.progress_bar(total=3, file=io.StringIO()), tqdm)
    monkeypatch.setenv("EBDIFF_PROGRESS", "lines")
    assert isinstance(progress.progress_bar(total=3, file=Tty()), progress.LineProgress)


def test_line_progress_writes_a_line_per_postfix_every_interval_and_at_the_end(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    bar = progress.LineProgress(total=100, desc="dense", file=out, initial=10)
    for _ in range(10):
        clock[0] += 1.0
        bar.update(1)
    assert out.getvalue() == ""  # no redraws
    bar.set_postfix(loss="0.0412", img_s="512")
    clock[0] += 31.0
    bar.update(5)  # past 30 s quiet: a line
    bar.set_description("ticket")
    bar.close()
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == ["dense: 20/100 (20%) 00:10, 1 it/s, loss=0.0412, img_s=512",
                     "dense: 25/100 (25%) 00:41, 0.366 it/s, loss=0.0412, img_s=512",
                     "ticket: 25/100 (25%) 00:41, 0.366 it/s, loss=0.0412, img_s=512"]
    assert "\r" not in out.getvalue()
    quiet = io.StringIO()
    assert list(progress.LineProgress(range(3), file=quiet, leave=False)) == [0, 1, 2] and quiet.getvalue() == ""


def test_training_log_to_a_file_is_one_line_per_interval(tmp_path, capfd, has_fmnist, monkeypatch):
    monkeypatch.delenv("EBDIFF_PROGRESS", raising=False)
    args = [a for a in tiny_args(tmp_path / "r", "train.iters=10") if a != "train.progress=false"]
    assert main(["train", *args, "train.progress=true"]) == 0
    err = capfd.readouterr().err
    assert "\r" not in err
    lines = [ln for ln in err.splitlines() if "/10 (" in ln]
    assert [ln.split(" ")[1] for ln in lines] == ["5/10", "10/10"], lines  # log_every=5
    assert "loss=" in lines[0] and "img_s=" in lines[0]
