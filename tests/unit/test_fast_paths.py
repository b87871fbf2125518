"""The issue-12 fast paths in masking give exactly what the stock calls give."""

from __future__ import annotations

import base64
import hmac
import ipaddress

from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from streams.privacy.masking import _b64, _HmacSha256, canonical_ip


def _reference_ip(value: str) -> tuple[str, bool]:
    text = value.strip()
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return text, False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped and not address.scope_id:
        return str(address.ipv4_mapped), True
    return address.compressed, True


_octet = st.one_of(
    st.integers(0, 300).map(str), st.sampled_from(["00", "01", "010", "1e1", "", " 1", "٣", "-1", "0x1"])
)


@hsettings(max_examples=500, deadline=None)
@given(st.lists(_octet, min_size=3, max_size=5), st.sampled_from(["", " ", "\n", "\t"]))
def test_dotted_quad_fast_path_agrees_with_ipaddress(octets, pad):
    text = pad + ".".join(octets) + pad
    assert canonical_ip(text) == _reference_ip(text)


@hsettings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=130), st.binary(max_size=300))
def test_precomputed_hmac_is_hmac_sha256(key, message):
    assert _HmacSha256(key).digest(message) == hmac.digest(key, message, "sha256")


@given(st.binary(max_size=300))
def test_b64_is_unpadded_urlsafe_base64(data):
    assert _b64(data) == base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
