"""vramkit.profiling.progress: tqdm.auto bars that follow the pipeline's progress bar settings."""

from __future__ import annotations

from types import SimpleNamespace

from vramkit.profiling import progress


def test_disabled_by_the_pipeline_config():
    pipe = SimpleNamespace(_progress_bar_config={"disable": True})
    bar = progress(range(3), "vramkit: packing", pipe=pipe)
    assert bar.disable is True
    assert list(bar) == [0, 1, 2]


def test_enabled_without_pipe_and_takes_desc_and_total(capsys):
    bar = progress(iter("abc"), "vramkit: quantizing", total=3, delay=0)
    assert bar.disable is False and bar.total == 3 and bar.desc == "vramkit: quantizing"
    assert list(bar) == ["a", "b", "c"]
    bar.close()


def test_explicit_disable_wins_and_other_settings_pass_through():
    pipe = SimpleNamespace(_progress_bar_config={"disable": True, "leave": False})
    bar = progress(range(2), "x", pipe=pipe, disable=False, delay=0)
    assert bar.disable is False and bar.leave is False
    bar.close()
    manual = progress(desc="manual", total=4, disable=True)
    with manual as b:
        b.update(4)


def test_real_tiny_pipeline_setting():
    from vramkit.testing import tiny_pipeline

    pipe = tiny_pipeline("flux")  # built with set_progress_bar_config(disable=True)
    assert progress(range(1), "x", pipe=pipe).disable is True
    pipe.set_progress_bar_config(disable=False)
    bar = progress(range(1), "x", pipe=pipe, delay=0)
    assert bar.disable is False
    bar.close()
