"""The redactor's cost is linear in its input (issue 13, defect 1): a long line without a line
break used to freeze the event loop for minutes. Matching in bounded windows still finds a
secret that sits across a window's edge, and opsplane's own tokens are masked by default."""

from __future__ import annotations

import random
import time

import pytest

from opsplane.domain.redaction import DEFAULT_REDACT_PATTERNS, MASK, OVERLAP, Redactor
from opsplane.security.agents import ENROLL_PREFIX
from opsplane.security.tokens import new_token

# The defaults made unknown to the redactor (no trigger words) and matched whole: the reference.
WHOLE = Redactor([pattern + "(?:)" for pattern in DEFAULT_REDACT_PATTERNS], window=1 << 40)


@pytest.mark.parametrize(
    "line",
    [
        b"password" * 8192,  # 64 KiB of the keyword: the old first pattern took minutes
        b"a" * 65536,  # 64 KiB of letters: the old first pattern took more than 100 s
        b"a." * 32768,
        b"x://" + b"a:" * 32768,
        b"authorization:" + b" " * 65536,
    ],
    ids=["keyword", "letters", "dots", "url", "spaces"],
)
def test_a_pathological_64_kib_line_is_redacted_in_a_few_seconds(line: bytes) -> None:
    started = time.process_time()
    Redactor(DEFAULT_REDACT_PATTERNS).data(line)
    Redactor(DEFAULT_REDACT_PATTERNS).text(line.decode())
    # Generous: about a hundredth of that on an idle core; the old patterns needed minutes.
    assert time.process_time() - started < 5


def _noise(rng: random.Random, size: int) -> str:
    return "".join(rng.choices("abc .=:/-_\t", k=size))


SECRETS = [
    "password=hunter2",
    'db_secret: "s3cr3t"',
    "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc",
    "AKIAIOSFODNN7EXAMPLE",
    "mysql://root:pa55@db/x",
    new_token(),
    ENROLL_PREFIX + new_token().removeprefix("ops_"),
    "api_key=" + "k" * 1500,  # longer than the overlap: matched again from its start
]


# Ids by position: the tokens are random, and pytest-xdist workers must collect the same names.
@pytest.mark.parametrize("secret", SECRETS, ids=[f"secret{i}" for i in range(len(SECRETS))])
def test_a_secret_across_a_window_edge_is_masked_as_if_matched_whole(secret: str) -> None:
    window = OVERLAP + 600
    small = Redactor(DEFAULT_REDACT_PATTERNS, window=window)
    noise = _noise(random.Random(secret), 5 * window)
    # The secret across the first window's end, and where the overlaps begin.
    edges = (window - OVERLAP, window, 2 * window - OVERLAP)
    stride = max(1, len(secret) // 20)
    for offset in [o for e in edges for o in range(e - len(secret) - 3, e + 3, stride)]:
        line = noise[:offset] + " " + secret + " " + noise[offset : offset + 3 * window]
        expected = WHOLE.text(line)
        assert MASK in expected
        assert small.text(line) == expected, offset
        assert small.data(line.encode()) == expected.encode(), offset


def test_many_secrets_in_a_long_line_are_all_masked() -> None:
    rng = random.Random(7)
    line = " ".join(
        rng.choice(SECRETS[:-1]) + " " + _noise(rng, rng.randrange(50)) for _ in range(3000)
    )
    assert len(line) > 3 * OVERLAP
    redacted = Redactor(DEFAULT_REDACT_PATTERNS, window=OVERLAP + 100).text(line)
    assert redacted == WHOLE.text(line)
    assert "hunter2" not in redacted and "pa55" not in redacted


def test_opsplane_tokens_are_masked_by_default() -> None:
    api, enroll = new_token(), ENROLL_PREFIX + new_token().removeprefix("ops_")
    redactor = Redactor(DEFAULT_REDACT_PATTERNS)
    line = f"agent --enroll {enroll} with {api}\n"
    assert redactor.text(line) == f"agent --enroll enr_{MASK} with ops_{MASK}\n"
    assert redactor.data(line.encode()) == line.encode().replace(
        enroll[4:].encode(), MASK.encode()
    ).replace(api[4:].encode(), MASK.encode())
    # Not a token: too short, or part of a longer name.
    for text in ("ops_short", "my_ops_" + "a" * 43, "ops_" + "a" * 44):
        assert redactor.text(text) == text


def test_case_and_non_ascii_text_are_kept_around_a_mask() -> None:
    redactor = Redactor(DEFAULT_REDACT_PATTERNS)
    for line in (
        "İstanbul DB_PASSWORD=Hunter2 Ünïcode",
        "AUTHORIZATION: BEARER AbCdEf123456 ß",
        "HTTPS://Deploy:S3cr3t@Host/ İİ TOKEN: X",
    ):
        assert redactor.text(line) == WHOLE.text(line) != line
        assert redactor.data(line.encode()) == WHOLE.data(line.encode())
