"""Redaction on real formats, including checksum-valid ID numbers and Luhn-valid card numbers."""

from __future__ import annotations

from loraplex.data.formats import Conversation
from loraplex.data.validate import find_duplicates, redact


def cn_id(body17: str) -> str:
    weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    return body17 + "10X98765432"[sum(int(d) * w for d, w in zip(body17, weights, strict=True)) % 11]


def luhn_complete(prefix: str) -> str:
    for check in "0123456789":
        digits = [int(d) for d in prefix + check][::-1]
        total = sum(d if i % 2 == 0 else (d * 2 - 9 if d * 2 > 9 else d * 2) for i, d in enumerate(digits))
        if total % 10 == 0:
            return prefix + check
    raise AssertionError


def test_phones_emails() -> None:
    text = "请联系13812345678或010-62345678，国际+1 650-253-0000，邮箱 hr.team@mingl-tech.cn。"
    r = redact(text)
    assert r.text == "请联系[PHONE]或[PHONE]，国际[PHONE]，邮箱 [EMAIL]。"
    assert r.counts == {"phone": 3, "email": 1}


def test_id_numbers_need_a_valid_checksum() -> None:
    valid = cn_id("11010519491231002")
    assert valid[-1] == "X"
    invalid = valid[:-1] + ("1" if valid[-1] != "1" else "2")
    r = redact(f"身份证号{valid}，另一个{invalid}")
    assert "身份证号[ID_CARD]" in r.text and invalid in r.text
    assert r.counts["id_card"] == 1


def test_bank_cards_need_luhn_and_accept_grouping() -> None:
    card = luhn_complete("622202020011223344")
    grouped = " ".join(card[i : i + 4] for i in range(0, len(card), 4))
    bad = card[:-1] + str((int(card[-1]) + 1) % 10)
    r = redact(f"卡号{card}，分组写法 {grouped}，订单号{bad}")
    assert r.counts["bank_card"] == 2
    assert bad in r.text and card not in r.text


def test_plain_numbers_untouched() -> None:
    text = "年假15天，报销上限8000元，订单20231012。"
    assert redact(text).text == text


def test_exact_duplicates() -> None:
    a = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    convs = [
        Conversation(a, "f:1"),
        Conversation(list(a), "f:2"),
        Conversation(a[:1] + [{"role": "assistant", "content": "b"}], "f:3"),
    ]
    assert find_duplicates(convs) == [["f:1", "f:2"]]
