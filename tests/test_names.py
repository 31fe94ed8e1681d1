"""adapters/names.py: every reader of a `model` field parses it here, so these are the rules."""

import pytest

from loraplex.adapters.names import (
    InvalidModelName,
    ModelSpec,
    Part,
    base_names,
    loose_names,
    parse,
    parse_ref,
    split_ref,
)
from loraplex.errors import UserError

BASES = base_names("smollm2-135m")


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("hr", (Part("hr"),)),
        ("hr@v2", (Part("hr", "v2"),)),
        ("hr@prod:0.5", (Part("hr", "prod", 0.5),)),
        (" legal:0.7+formal@v2:0.3 ", (Part("legal", "", 0.7), Part("formal", "v2", 0.3))),
        ("a:-1e0", (Part("a", "", -1.0),)),
    ],
)
def test_model_names_parse_into_parts_and_print_back(text: str, parts: tuple[Part, ...]) -> None:
    spec = parse(text, BASES)
    assert spec.parts == parts
    assert parse(str(spec), BASES) == spec  # the canonical text reads back the same


@pytest.mark.parametrize("text", ["base", "default", "smollm2-135m", "", "  "])
def test_the_base_model_is_an_empty_spec(text: str) -> None:
    spec = parse(text, BASES)
    assert spec.parts == () and str(spec) == ""


@pytest.mark.parametrize(
    "text",
    ["hr@../../x", "../hr", "HR", "hr:", "hr:abc", "hr:11", "hr:nan", "hr:inf", "hr+", "+hr", "hr@a@b", "a b", "hr\nx"],
)
def test_malformed_names_are_refused_with_the_syntax(text: str) -> None:
    with pytest.raises(InvalidModelName, match="NAME|weight"):
        parse(text, BASES)


def test_references_take_no_weight_and_exact_versions_are_numbers() -> None:
    assert parse_ref("hr@prod") == Part("hr", "prod") and parse_ref("hr@v12").ref == "hr@v12"
    assert parse_ref("hr").ref == "hr"
    for bad in ("hr:0.5", "a+b", "hr@../x", "Hr"):
        with pytest.raises(UserError, match="NAME@vN"):
            parse_ref(bad)


def test_loose_readers_do_not_validate_upstream_names() -> None:
    # key scopes and output filters match globs against names an upstream may own
    assert loose_names("gpt-4o") == ("gpt-4o",)
    assert loose_names("legal@v2:0.7+formal") == ("legal", "formal")
    assert split_ref("org/Model@v3") == ("org/Model", "v3") and split_ref("hr") == ("hr", "")
    assert str(ModelSpec((Part("a", "v1", 0.5), Part("b")))) == "a@v1:0.5+b"
