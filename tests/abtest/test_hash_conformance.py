"""GrowthBook hashing v2 on non-ASCII salts and ids, against the SDKs' own algorithms.

The expected buckets below were computed by running the JavaScript SDK's ``hashFnv32a`` and
``hash(seed, value, 2)`` (growthbook/growthbook ``packages/sdk-js/src/util.ts``, which XORs
``str.charCodeAt(i)``, a UTF-16 code unit) under Node; they also list its inner 32-bit hash. The
Python SDK (growthbook/growthbook-python ``growthbook/core.py``, ``fnv1a32`` XORs ``ord(ch)``) is
written out below as an independent reference: it agrees with the JavaScript SDK on every
character up to U+FFFF and disagrees beyond it, which is why such salts are refused at load.
Hashing UTF-8 bytes, as the splitter once did, gives 0.1719 for ("sé", "1") where both SDKs
give 0.992.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from abtest.experiments import experiments_from_dict
from abtest.splitter import fnv1a32, hash_v2, user_bucket, user_buckets
from core.errors import ExperimentConfigError

# (seed, value, JS SDK hash(seed, value, 2), JS SDK hashFnv32a(seed + value))
JS_SDK_CASES = [
    ("sé", "1", 0.992, 4294126016),
    ("sé", "42", 0.2947, 2010592087),
    ("café", "7", 0.6994, 2713948177),
    ("日本", "99", 0.001, 2478502458),
    ("ümlaut-v1", "31337", 0.3325, 541173573),
    ("é", "", 0.8917, 1812687940),
    ("épreuve-v1", "12345", 0.6955, 249867844),
    ("Ωmega", "0", 0.9826, 2512967894),
    ("se\u0301", "1", 0.1401, 847643815),  # decomposed é: other code units, another bucket
    ("\ufb01x", "8", 0.1, 4098289324),
    ("salt\U0001f600", "5", 0.0143, 788581003),  # beyond U+FFFF: the JS SDK's answer
]


def python_sdk_fnv1a32(text: str) -> int:
    """growthbook-python's ``fnv1a32``: XOR each code point (``ord``), multiply, mod 2**32."""
    h = 0x811C9DC5
    for ch in text:
        h = ((h ^ ord(ch)) * 0x01000193) % 2**32
    return h


def python_sdk_hash_v2(seed: str, value: str) -> float:
    return (python_sdk_fnv1a32(str(python_sdk_fnv1a32(seed + value))) % 10000) / 10000


@pytest.mark.parametrize(("seed", "value", "bucket", "inner"), JS_SDK_CASES)
def test_hash_matches_the_javascript_sdk(seed: str, value: str, bucket: float, inner: int) -> None:
    assert fnv1a32(seed + value) == inner
    assert hash_v2(seed, value) == pytest.approx(bucket, abs=1e-12)
    if value.isdigit():
        assert user_bucket(seed, int(value)) == round(bucket * 10_000)
        assert user_buckets(seed, np.array([int(value)]))[0] == round(bucket * 10_000)


def test_the_sdks_agree_below_u_ffff_and_not_beyond() -> None:
    for seed, value, bucket, _ in JS_SDK_CASES:
        beyond = any(ord(c) > 0xFFFF for c in seed + value)
        assert (python_sdk_hash_v2(seed, value) == bucket) is not beyond, seed
    utf8 = fnv1a32(str(fnv1a32("sé1".encode())).encode("ascii")) % 10_000 / 10_000
    assert (utf8, hash_v2("sé", "1")) == (0.1719, 0.992)  # UTF-8 bytes: what issue 18 found


bmp_text = st.text(
    alphabet=st.characters(max_codepoint=0xFFFF, exclude_categories=["Cs"]), max_size=16
)


@settings(max_examples=300, deadline=None)
@given(seed=bmp_text, user_id=st.integers(0, 2**63 - 1))
def test_every_bmp_string_hashes_as_the_python_sdk_does(seed: str, user_id: int) -> None:
    expected = python_sdk_hash_v2(seed, str(user_id))
    assert hash_v2(seed, str(user_id)) == expected
    assert user_bucket(seed, user_id) == round(expected * 10_000)
    assert user_buckets(seed, np.array([user_id], dtype=np.uint64))[0] == round(expected * 10_000)


def config_with_salt(salt: str) -> dict[str, object]:
    return {
        "default_model": "sasrec",
        "layers": [{"name": "l", "salt": "layer-salt"}],
        "experiments": [
            {
                "name": "e",
                "layer": "l",
                "salt": salt,
                "range": [0, 1],
                "variants": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}],
            }
        ],
    }


def test_non_ascii_salts_load_and_salts_beyond_u_ffff_are_refused() -> None:
    assert experiments_from_dict(config_with_salt("épreuve-v1")).experiments[0].salt == "épreuve-v1"
    with pytest.raises(ExperimentConfigError, match=r"experiments\[0\]\.salt: .*U\+1F600"):
        experiments_from_dict(config_with_salt("salt\U0001f600"))
