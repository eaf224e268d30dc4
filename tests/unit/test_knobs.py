"""harness.knobs: a server switch with a fixed set of values fails loudly on anything else."""

from __future__ import annotations

import pytest

from harness import knobs

NAME = "HARNESS_TEST_KNOB"


def test_unset_or_empty_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NAME, raising=False)
    assert knobs.choice(NAME, ("on", "off"), "on") == "on"
    monkeypatch.setenv(NAME, "")
    assert knobs.choice(NAME, ("on", "off"), "off") == "off"


def test_a_listed_value_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NAME, "block")
    assert knobs.choice(NAME, ("spin", "block", "hybrid"), "spin") == "block"


@pytest.mark.parametrize(("choices", "expected"), [
    (("on", "off"), "expected on or off"),
    (("spin", "block", "hybrid"), "expected spin, block or hybrid"),
])
def test_anything_else_names_the_choices(monkeypatch: pytest.MonkeyPatch,
                                         choices: tuple[str, ...], expected: str) -> None:
    monkeypatch.setenv(NAME, "On")
    with pytest.raises(ValueError, match=f"^{NAME}='On': {expected}$"):
        knobs.choice(NAME, choices, choices[0])


def test_environment_sets_for_the_block_and_restores_even_on_an_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    other = NAME + "_SET"
    monkeypatch.delenv(NAME, raising=False)
    monkeypatch.setenv(other, "before")
    with knobs.environment({NAME: "frame", other: "during"}):
        assert os.environ[NAME] == "frame" and os.environ[other] == "during"
    assert NAME not in os.environ and os.environ[other] == "before"
    with pytest.raises(RuntimeError), knobs.environment({NAME: "x", other: "y"}):
        raise RuntimeError("the block failed")
    assert NAME not in os.environ and os.environ[other] == "before"
