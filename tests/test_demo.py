"""The README's main job: the demo runs end to end and passes its dense check."""

from dsv4fn.__main__ import main
from dsv4fn.demo import run_demo


def test_demo_matches_dense_evaluation():
    worst = run_demo(prompts=(21, 40, 5), decode_steps=3, chunk=16, verbose=False)
    assert worst <= 1e-2


def test_cli_usage_and_demo(capsys):
    assert main(["nope"]) == 2
    assert main(["demo", "--decode-steps", "2", "--chunk", "64"]) == 0
    out = capsys.readouterr().out
    assert "dense check PASSED" in out and "decode" in out
