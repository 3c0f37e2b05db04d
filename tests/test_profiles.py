"""Profiles: defaults, overrides, proposal grammar, durations and rekey sanity."""

from __future__ import annotations

import pytest

from rollout import errors, model, profiles


def resolve(profile: str = "modern", overrides: tuple[tuple[str, object], ...] = (),
            charon: tuple[tuple[str, object], ...] = ()) -> profiles.ResolvedSettings:
    ipsec = model.IpsecSettings(profile=profile, overrides=overrides, charon_overrides=charon)
    return profiles.resolve(ipsec)


def test_modern_defaults() -> None:
    s = resolve()
    assert (s.ike_proposals, s.esp_proposals) == ("aes256gcm16-prfsha384-ecp384", "aes256gcm16-ecp384")
    assert (s.mobike, s.encap, s.dpd_delay, s.keyingtries, s.unique) == (False, False, 30, 0, "no")
    assert (s.send_cert, s.revocation, s.require_pfs) == ("ifasked", "relaxed", True)
    t = s.timing
    assert (t.rekey_time, t.reauth_time, t.child_rekey_time) == (4 * 3600, 24 * 3600, 3600)
    assert dict(s.charon) == {"make_before_break": "yes", "install_routes": "no",
                              "close_ike_on_child_failure": "yes"}


def test_wmf_2015_values_and_margin_equivalents() -> None:
    s = resolve("wmf-2015")
    assert s.ike_proposals == "aes128gcm16-prfsha384-ecp384bp"
    assert s.esp_proposals == "aes128gcm16-ecp384bp-noesn"
    t = s.timing
    # lifetime 1h, margintime 13m, rekeyfuzz 100%: rekey between 34 and 47 minutes
    assert (t.child_life_time, t.child_rekey_time, t.child_rand_time) == (3600, 47 * 60, 13 * 60)
    assert (t.reauth_time, t.rekey_time) == (167 * 60, 0)  # reauth=yes: IKE rekeying reauthenticates
    assert t.legacy == profiles.LegacyTiming(lifetime=3600, ikelifetime=3 * 3600, margintime=13 * 60,
                                             rekeyfuzz=100, reauth=True)
    assert dict(s.charon) == {"make_before_break": "yes", "close_ike_on_child_failure": "yes",
                              "dos_protection": "no", "retransmit_base": "1.2",
                              "retransmit_timeout": "2.0", "retransmit_tries": "15"}


@pytest.mark.parametrize(("local", "peer", "initiator", "enforce", "expected"), [
    ("a", "b", True, False, "restart"), ("b", "a", False, False, "clear"), ("a", "b", True, True, "trap"),
])
def test_modern_dpd_action(local: str, peer: str, initiator: bool, enforce: bool, expected: str) -> None:
    assert resolve().dpd_action_for(local, peer, initiator=initiator, enforce=enforce) == expected


def test_wmf_dpd_restart_on_greater_fqdn_only() -> None:
    s = resolve("wmf-2015")
    assert s.dpd_action_for("cp3030.esams", "cp1065.eqiad", initiator=False, enforce=False) == "restart"
    assert s.dpd_action_for("cp1065.eqiad", "cp3030.esams", initiator=True, enforce=True) == "clear"


def test_historical_typo_is_rejected_with_hint() -> None:
    with pytest.raises(errors.RenderError) as info:
        resolve("wmf-2015", charon=(("retramsmit_tries", 15),))
    text = str(info.value)
    assert "retramsmit_tries" in text and "did you mean retransmit_tries" in text
    assert "valid keys" in text and info.value.exit_code == errors.ExitCode.RENDER_INVALID


def test_unknown_override_key_lists_valid_keys() -> None:
    with pytest.raises(errors.RenderError, match=r"did you mean rekey_time.*valid keys: .*child_rekey_time"):
        resolve(overrides=(("rekey_tme", "4h"),))


def test_overrides_apply() -> None:
    s = resolve(overrides=(("ike_proposals", "aes256gcm16-prfsha256-x25519"), ("dpd_delay", 10),
                           ("mobike", "yes"), ("rekey_time", "2h")),
                charon=(("retransmit_tries", "7"), ("make_before_break", False)))
    assert s.ike_proposals == "aes256gcm16-prfsha256-x25519" and s.dpd_delay == 10 and s.mobike
    assert s.timing.rekey_time == 7200
    assert dict(s.charon)["retransmit_tries"] == "7" and dict(s.charon)["make_before_break"] == "no"


def test_unknown_profile() -> None:
    with pytest.raises(errors.RenderError, match="modern, wmf-2015"):
        resolve("bogus")


def test_timing_form_mismatch_is_explained() -> None:
    with pytest.raises(errors.RenderError, match="override .*margintime"):
        resolve("wmf-2015", overrides=(("child_rekey_time", "30m"),))
    with pytest.raises(errors.RenderError, match="margin-form"):
        resolve(overrides=(("margintime", "9m"),))


@pytest.mark.parametrize("proposal", [
    "aes256gcm16-prfsha384-ecp384", "aes128-sha256-modp2048", "chacha20poly1305-prfsha256-x25519",
    "aes256gcm16-prfsha384-ecp384,aes128-sha256-ecp256", "aes256ctr-sha512-prfsha512-curve448",
])
def test_valid_ike_proposals(proposal: str) -> None:
    assert profiles.validate_proposals(proposal, kind="ike", require_pfs=True, key="k") == proposal


@pytest.mark.parametrize(("proposal", "kind", "message"), [
    ("aes256gcm16-prfsha384", "ike", "key exchange"),
    ("aes256gcm16-ecp384", "ike", "needs a PRF"),
    ("aes256gcm16-sha256-ecp384", "esp", "needs no integrity"),
    ("aes256-ecp384", "esp", "needs an integrity"),
    ("aes256gcm16-ecp384-none", "esp", "PFS is mandatory"),
    ("aes256gcm16", "esp", "PFS is mandatory"),
    ("aes256gcm16-prfsha384-ecp384", "esp", "IKE-only"),
    ("aes256gcm16-prfsha384-ecp384-noesn", "ike", "ESP-only"),
    ("aes256gcm16-aes128-sha256-prfsha384-ecp384", "ike", "mixes AEAD"),
    ("sha256-ecp384", "esp", "no encryption"),
    ("default", "ike", "unsupported"),
    ("", "ike", "non-empty"),
])
def test_invalid_proposals(proposal: str, kind: str, message: str) -> None:
    with pytest.raises(errors.RenderError, match=message):
        profiles.validate_proposals(proposal, kind=kind, require_pfs=True, key="k")  # type: ignore[arg-type]


def test_unknown_algorithm_gets_a_suggestion() -> None:
    with pytest.raises(errors.RenderError, match="did you mean ecp384"):
        profiles.validate_proposals("aes256gcm16-prfsha384-ecp348", kind="ike", require_pfs=True, key="k")


def test_pfs_can_be_made_optional_explicitly() -> None:
    s = resolve(overrides=(("require_pfs", False), ("esp_proposals", "aes256gcm16-ecp384-none")))
    assert s.esp_proposals.endswith("-none")


@pytest.mark.parametrize(("text", "seconds"), [("4h", 14400), ("13m", 780), ("90s", 90), (3600, 3600),
                                                 ("1d", 86400), ("120", 120)])
def test_parse_duration(text: object, seconds: int) -> None:
    assert profiles.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["4 hours", "1h30m", -1, True, "", None, 1.5])
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(errors.RenderError):
        profiles.parse_duration(text)


@pytest.mark.parametrize(("seconds", "text"), [(14400, "4h"), (10020, "167m"), (90, "90s"), (0, "0"),
                                                 (86400, "1d"), (3961, "3961s")])
def test_format_duration_uses_one_unit(seconds: int, text: str) -> None:
    assert profiles.format_duration(seconds) == text


def test_margin_sanity() -> None:
    with pytest.raises(errors.RenderError) as info:
        resolve("wmf-2015", overrides=(("margintime", "31m"),))  # 31m * 2 = 62m > 1h
    assert "31m" in str(info.value) and "lifetime 1h" in str(info.value) and "fix:" in str(info.value)
    resolve("wmf-2015", overrides=(("margintime", "29m"),))
    resolve("wmf-2015", overrides=(("margintime", "31m"), ("rekeyfuzz", "50%")))


@pytest.mark.parametrize(("overrides", "message"), [
    ((("child_rekey_time", "2h"),), "must be below child_life_time"),
    ((("child_rand_time", "10m"),), "child_rand_time"),
    ((("rekey_time", 0), ("reauth_time", 0)), "never renew"),
    ((("rand_time", "5h"),), "rand_time"),
    ((("child_rekey_time", 0),), "positive"),
])
def test_swanctl_rekey_sanity(overrides: tuple[tuple[str, object], ...], message: str) -> None:
    with pytest.raises(errors.RenderError, match=message):
        resolve(overrides=overrides)


@pytest.mark.parametrize(("key", "value"), [("mobike", "maybe"), ("keyingtries", -1), ("unique", "sometimes"),
                                            ("version", 1), ("key_type", "DSA"), ("replay_window", "x")])
def test_bad_values(key: str, value: object) -> None:
    with pytest.raises(errors.RenderError, match=key):
        resolve(overrides=((key, value),))


def test_every_setting_is_documented() -> None:
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "rendering.md").read_text()
    for key in (*profiles.SETTINGS, *profiles.CHARON_SETTINGS):
        assert f"`{key}`" in doc, f"{key} missing from docs/rendering.md"
