import pyarrow as pa

from raylm.pipelines.config import NormalizeConfig, PIIConfig
from raylm.pipelines.normalize import Normalize, ScrubPII


def table(texts, rejects=None):
    n = len(texts)
    return pa.table(
        {
            "id": [str(i) for i in range(n)],
            "text": texts,
            "source": ["s"] * n,
            "reject": pa.array(rejects or [None] * n, pa.string()),
        }
    )


def test_nfkc_control_and_whitespace():
    out = Normalize(NormalizeConfig())(
        table(["ｆｉ\ufb01 \u200bword\x07\t\t x\r\n\n\n\n\nend  ", "   \x00  "])
    )
    assert out.column("text").to_pylist() == ["fifi word x\n\nend", ""]
    assert out.column("reject").to_pylist() == [None, "empty_text"]


def test_rejected_rows_keep_their_raw_text():
    out = Normalize(NormalizeConfig())(table(["  raw  "], ["malformed_json: x"]))
    assert out.column("text").to_pylist() == ["  raw  "]


def test_pii_placeholders():
    text = (
        "Write to jane.doe+list@mail.example.org from 10.0.0.255, or call +44 20 7946 0958 / (415) 555-0132. "
        "IPv6 2001:db8:85a3::8a2e:370:7334. The year 2024 and 1234567 items stay."
    )
    out = ScrubPII(PIIConfig())(table([text])).column("text")[0].as_py()
    assert "jane" not in out and "10.0.0.255" not in out and "7946" not in out and "555-0132" not in out
    assert "370:7334" not in out
    assert out.count("<EMAIL>") == 1 and out.count("<IP_ADDRESS>") == 2 and out.count("<PHONE>") == 2
    assert "2024" in out and "1234567" in out
