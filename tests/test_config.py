"""The configuration framework: loading, every validation rule, and the sample file."""

from __future__ import annotations

import dataclasses
import logging
import pickle
import re
import types
from pathlib import Path

import pytest

import l4proxy.config
from l4proxy.config import (
    HARD_MAX_CERT_TTL,
    AccessRule,
    CaConfig,
    CheckResult,
    ClaimMapping,
    ClientCredentials,
    Config,
    ConfigError,
    ControlConfig,
    DeclaredScope,
    GatewayConfig,
    JwksSourceKind,
    LimitsConfig,
    ListenerConfig,
    Problem,
    ProviderConfig,
    TargetConfig,
    TargetProtocol,
    check_config,
    load_config,
)

SAMPLE = Path(__file__).resolve().parent.parent / "examples" / "l4proxy.toml"

GATEWAY = """
[gateway]
id = "gw-1"
state_dir = "state"
"""

CA = """
[ca]
dir = "certs"
"""


def provider(*lines: str, name: str = "corp", who: str = 'allowed_email_domains = ["example.com"]') -> str:
    """One [[identity.providers]] block: a valid one, plus ``lines``."""
    body = "\n".join(lines)
    return f"""
[[identity.providers]]
name = "{name}"
issuer = "https://login.example.com"
audience = "l4proxy"
{who}
{body}
"""


#: every configuration with listeners must record its sessions; ``write`` adds this table
#: to a configuration that has listeners and no [recording] (tests of that rule pass
#: ``add_recording=False``)
RECORDING = '\n[recording]\ndir = "recordings"\n'


def write(tmp_path: Path, text: str, name: str = "l4proxy.toml", *,
          add_recording: bool = True) -> Path:
    if add_recording and "[[listeners]]" in text and "[recording]" not in text:
        text += RECORDING
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def check(tmp_path: Path, text: str) -> CheckResult:
    return check_config(write(tmp_path, text))


def problems(tmp_path: Path, text: str) -> list[tuple[str, str]]:
    return [(p.path, p.message) for p in check(tmp_path, text).problems]


def only_problem(tmp_path: Path, text: str) -> Problem:
    result = check(tmp_path, text)
    assert len(result.problems) == 1, result.problems
    assert result.config is None
    return result.problems[0]


def assert_problem(tmp_path: Path, text: str, path: str, phrase: str) -> None:
    p = only_problem(tmp_path, text)
    assert p.path == path
    assert phrase in p.message, p.message


# --- the sample configuration -------------------------------------------------------------


#: the sample names a credential file that only a deployment creates (0600, never in git)
SAMPLE_KEY_WARNING = Problem("targets[0].credential.file", "does not exist yet: it is read at each upstream "
                                                           "connect, and sessions to this target fail until "
                                                           "it exists")


def test_sample_checks_clean() -> None:
    result = check_config(SAMPLE)
    assert result.problems == ()
    assert result.warnings == (SAMPLE_KEY_WARNING,)
    assert result.ok
    assert result.config == load_config(SAMPLE)


def test_sample_is_warning_free_once_its_credential_file_exists(tmp_path: Path) -> None:
    path = write(tmp_path, SAMPLE.read_text())
    (tmp_path / "secrets").mkdir()
    key = tmp_path / "secrets" / "chunkd.key"
    key.touch(mode=0o600)
    key.chmod(0o600)  # whatever the umask
    result = check_config(path)
    assert result.problems == () and result.warnings == ()


def test_sample_content() -> None:
    config = load_config(SAMPLE)
    assert config.source == SAMPLE
    assert config.gateway == GatewayConfig(id="gw-1", state_dir=SAMPLE.parent / "state")
    assert config.ca == CaConfig(dir=SAMPLE.parent / "certs")
    corp, ci = config.providers
    assert config.provider("corp") is corp and config.provider("nope") is None
    assert corp.jwks_source is JwksSourceKind.DISCOVERY and corp.jwks_location is None
    assert corp.allowed_email_domains == ("example.com",)
    # the CI workload-token provider
    assert ci.subject_claim == "repository"
    assert ci.jwks_source is JwksSourceKind.URL
    assert ci.jwks_location == "https://token.actions.githubusercontent.com/.well-known/jwks"
    assert ci.bound_claims == (("ref", ("refs/heads/main", "refs/tags/v*")), ("repository_owner", ("acme",)))
    assert ci.claim_mappings[0] == ClaimMapping(claim="repository", value="acme/app", groups=("ci-app",))
    assert ci.max_cert_ttl == 1800.0
    # the data path: [limits] shows every default
    assert config.limits == LimitsConfig()
    chunks, cache = config.targets
    assert config.target("chunks") is chunks
    assert chunks == TargetConfig(
        name="chunks", upstream=("127.0.0.1", 7070), protocol=TargetProtocol.CWP,
        credential_file=SAMPLE.parent / "secrets" / "chunkd.key", server_names=("chunks.gw.example",),
        access=AccessRule(groups=("eng", "ci-etl")),
        credential_scope=DeclaredScope(buckets=("datasets", "chunks-*"), tables=("events",),
                                       access=("read", "write")))
    assert cache.protocol is TargetProtocol.TCP and cache.upstream_tls
    assert cache.upstream_ca == SAMPLE.parent / "certs" / "cache-ca.pem"
    assert cache.credential_file is None and cache.credential_env is None
    (main,) = config.listeners
    assert main == ListenerConfig(name="main", listen=("127.0.0.1", 7443),
                                  server_cert=SAMPLE.parent / "certs" / "server.crt",
                                  server_key=SAMPLE.parent / "certs" / "server.key",
                                  client_ca=SAMPLE.parent / "certs" / "bundle.pem",
                                  targets=("chunks", "cache"))


def _documented_keys(cls: type) -> set[str]:
    keys = {f.name for f in dataclasses.fields(cls)} - {"jwks_source", "jwks_location", "source",
                                                         "credential_file", "credential_env",
                                                         "audit_stdout"}
    return keys | ({"jwks"} if cls is ProviderConfig else set()) | ({"credential"} if cls is TargetConfig
                                                                    else set())


@pytest.mark.parametrize("cls", [GatewayConfig, ControlConfig, CaConfig, ProviderConfig, LimitsConfig,
                                 TargetConfig, AccessRule, DeclaredScope, ListenerConfig])
def test_sample_documents_every_key(cls: type) -> None:
    text = SAMPLE.read_text()
    for key in _documented_keys(cls):
        assert re.search(rf"^(# )?{key} = |\.{key}\]+$", text, re.MULTILINE), key


def test_recording_section(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GATEWAY + '[recording]\ndir = "rec"\nzstd_level = -3\n'
                                                   'flush_interval = "50ms"\n'))
    assert config.recording is not None and config.recording.dir == tmp_path / "rec"
    assert (config.recording.zstd_level, config.recording.flush_interval) == (-3, 0.05)
    assert load_config(write(tmp_path, GATEWAY)).recording is None
    assert_problem(tmp_path, GATEWAY + '[recording]\ndir = "r"\nzstd_level = 30\n',
                   "recording.zstd_level", "-7 (fastest) to 19")
    assert_problem(tmp_path, GATEWAY + '[recording]\ndir = "r"\nflush_interval = "5s"\n',
                   "recording.flush_interval", "1s")
    assert_problem(tmp_path, GATEWAY + "[recording]\nzstd_level = 1\n", "recording.dir",
                   "missing required key")


def test_recording_is_required_with_listeners_and_off_only_by_name(tmp_path: Path) -> None:
    listening = GATEWAY + target() + listener()
    result = check_config(write(tmp_path, listening, add_recording=False))
    assert [(p.path, "missing required table" in p.message) for p in result.problems] == \
        [("recording", True)]
    assert "enabled = false" in result.problems[0].message
    # the bench-only switch: accepted, with a warning, and no recording configured
    result = check_config(write(tmp_path, listening + "[recording]\nenabled = false\n"))
    assert result.problems == () and result.config is not None
    assert result.config.recording is None
    assert [(w.path, "NOT recorded" in w.message) for w in result.warnings] == \
        [("recording.enabled", True)]
    # other keys would suggest a recording that is not happening
    assert_problem(tmp_path, listening + '[recording]\nenabled = false\ndir = "r"\n',
                   "recording.dir", "no effect with enabled = false")
    on = load_config(write(tmp_path, listening + '[recording]\nenabled = true\ndir = "r"\n'))
    assert on.recording is not None and on.recording.dir == tmp_path / "r"


def test_audit_log_settings(tmp_path: Path) -> None:
    default = load_config(write(tmp_path, GATEWAY))
    assert default.gateway.audit_path == tmp_path / "state" / "audit.jsonl"
    stdout = load_config(write(tmp_path, GATEWAY.replace(
        "[gateway]\n", '[gateway]\naudit_log = "-"\naudit_max_bytes = "10MiB"\naudit_backups = 2\n')))
    assert stdout.gateway.audit_path is None and stdout.gateway.audit_max_bytes == 10 << 20
    assert stdout.gateway.audit_backups == 2
    filed = load_config(write(tmp_path, GATEWAY.replace(
        "[gateway]\n", '[gateway]\naudit_log = "logs/a.jsonl"\n')))
    assert filed.gateway.audit_path == tmp_path / "logs" / "a.jsonl"
    bad = check_config(write(tmp_path, GATEWAY.replace("[gateway]\n", "[gateway]\naudit_backups = 0\n")))
    assert [p.path for p in bad.problems] == ["gateway.audit_backups"]


def test_sample_dev_provider_block_is_valid_when_uncommented(tmp_path: Path) -> None:
    text = SAMPLE.read_text()
    block = text.split("# [[identity.providers]]", 1)[1].split("# --- end dev", 1)[0]
    uncommented = "[[identity.providers]]" + re.sub(r"^# ", "", block, flags=re.MULTILINE)
    config = load_config(write(tmp_path, text + uncommented))
    dev = config.providers[-1]
    assert dev.name == "dev" and dev.issuer == "http://127.0.0.1:9000"


# --- results and errors -------------------------------------------------------------------


def test_problem_str_and_config_error_lists_every_problem(tmp_path: Path) -> None:
    assert str(Problem("gateway.colour", "unknown key")) == "gateway.colour: unknown key"
    path = write(tmp_path, GATEWAY + "colour = 1\n[control]\nrate_per_address = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).splitlines() == ["gateway.colour: unknown key",
                                            "control.rate_per_address: must be at least 1"]
    assert [p.path for p in info.value.problems] == ["gateway.colour", "control.rate_per_address"]
    copy = pickle.loads(pickle.dumps(info.value))
    assert copy.problems == info.value.problems and str(copy) == str(info.value)


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    text = """
[gateway]
id = "GW!"
state_dir = "state"
colour = "blue"
[control]
rate_per_identity = true
"""
    assert problems(tmp_path, text) == [
        ("gateway.colour", "unknown key"),
        ("gateway.id", "must be 1 to 63 lower-case letters, digits and '-', starting with a letter or digit"),
        ("control.rate_per_identity", "expected an integer, got a boolean"),
    ]


def test_warnings_do_not_fail_and_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, GATEWAY + CA + provider("allow_any_subject = true", who=""))
    result = check_config(path)
    assert result.ok and result.config is not None
    with caplog.at_level(logging.WARNING, logger="l4proxy.config"):
        load_config(path)
    assert "identity.providers[0].allow_any_subject: any subject" in caplog.text


def test_unreadable_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    (p,) = check_config(missing).problems
    assert p.path == "" and "cannot read" in p.message and str(missing) in str(p)
    (p,) = check_config(tmp_path).problems  # a directory
    assert "cannot read" in p.message
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(missing)


@pytest.mark.parametrize(("content", "phrase"), [
    (b"[gateway\n", "invalid TOML"),
    (b"[gateway]\nid = 'a'\nid = 'b'\n", "invalid TOML"),  # TOML itself refuses duplicate keys
    (b"[gateway]\nid = '\xff'\n", "not UTF-8"),
    (b"# " + b"x" * (1 << 20) + b"\n", "larger than 1 MiB"),
])
def test_bad_files(tmp_path: Path, content: bytes, phrase: str) -> None:
    path = tmp_path / "l4proxy.toml"
    path.write_bytes(content)
    (p,) = check_config(path).problems
    assert p.path == "" and phrase in p.message


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "l4proxy.toml"
    path.write_bytes(b"\xef\xbb\xbf" + GATEWAY.encode())
    assert check_config(path).ok


# --- defaults, paths, durations, sizes ------------------------------------------------------


def test_defaults_applied(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GATEWAY))
    assert config.control == ControlConfig()
    assert config.control.listen == ("127.0.0.1", 8443) and config.control.max_body == 64 << 10
    assert config.providers == () and config.ca is None
    config = load_config(write(tmp_path, GATEWAY + CA + provider()))
    assert config.ca == CaConfig(dir=tmp_path / "certs", trust_domain="l4proxy.local",
                                 breakglass_max_ttl=3600)
    (p,) = config.providers
    assert p == ProviderConfig(name="corp", issuer="https://login.example.com", audience="l4proxy",
                               jwks_source=JwksSourceKind.DISCOVERY, allowed_email_domains=("example.com",))
    assert p.subject_claim == "sub" and p.groups_claim is None and p.default_cert_ttl == 600.0


def test_relative_paths_resolve_against_the_config_dir(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = GATEWAY + '[ca]\ndir = "/abs/certs"\n' + provider('jwks = { file = "keys/jwks.json" }')
    write(conf_dir, text)
    config = load_config(Path("..") / "etc" / "l4proxy.toml")  # a relative config path, too
    conf_dir = conf_dir.resolve()
    assert config.source == conf_dir / "l4proxy.toml"
    assert config.gateway.state_dir == conf_dir / "state"
    assert config.ca is not None and config.ca.dir == Path("/abs/certs")
    assert config.providers[0].jwks_source is JwksSourceKind.FILE
    assert config.providers[0].jwks_location == str(conf_dir / "keys" / "jwks.json")


def test_durations_and_sizes_are_parsed(tmp_path: Path) -> None:
    text = GATEWAY + '[control]\nmax_body = 2048\n[ca]\ndir = "c"\nbreakglass_max_ttl = 1800\n' + provider(
        'default_cert_ttl = "1h30m"', 'max_cert_ttl = "2h"', "leeway = 0", 'max_token_bytes = "8KiB"',
        'jwks_min_cache = "90s"', "fetch_timeout = 2.5", 'max_token_age = "1d"')
    config = load_config(write(tmp_path, text))
    (p,) = config.providers
    assert config.control.max_body == 2048
    assert config.ca is not None and config.ca.breakglass_max_ttl == 1800.0
    assert (p.default_cert_ttl, p.max_cert_ttl, p.leeway) == (5400.0, 7200.0, 0.0)
    assert (p.max_token_bytes, p.jwks_min_cache) == (8192, 90.0)
    assert (p.fetch_timeout, p.max_token_age) == (2.5, 86400.0)


def test_objects_are_frozen(tmp_path: Path) -> None:
    config = load_config(SAMPLE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.gateway = GatewayConfig(id="x", state_dir=Path())  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.providers[0].allow_any_subject = True  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.control.rate_per_identity = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Problem("a", "b").path = "c"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        check_config(SAMPLE).problems = ()  # type: ignore[misc]
    assert isinstance(config.providers, tuple) and isinstance(config.control.admin_groups, tuple)


# --- unknown and missing keys ---------------------------------------------------------------


@pytest.mark.parametrize(("text", "path"), [
    (GATEWAY + "colour = 1\n", "gateway.colour"),
    (GATEWAY + "[colour]\n", "colour"),
    (GATEWAY + "[control]\nlisten_addr = '127.0.0.1:1'\n", "control.listen_addr"),
    (GATEWAY + CA + "rotate = true\n", "ca.rotate"),
    (GATEWAY + "[identity]\nproviderz = []\n", "identity.providerz"),
    (GATEWAY + CA + provider("colour = 1"), "identity.providers[0].colour"),
    (GATEWAY + CA + provider('jwks = { url = "https://x.example/j", colour = 1 }'),
     "identity.providers[0].jwks.colour"),
    (GATEWAY + CA + provider('[[identity.providers.claim_mappings]]\nclaim = "a"\nvalue = "b"\n'
                             'groups = ["g"]\ncolour = 1'), "identity.providers[0].claim_mappings[0].colour"),
    (GATEWAY + '"we ird.key" = 1\n', 'gateway."we ird.key"'),
])
def test_unknown_keys(tmp_path: Path, text: str, path: str) -> None:
    assert_problem(tmp_path, text, path, "unknown key")


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    text = '[gateway]\nid = "gw"\nstatedir = "s"\n'
    assert problems(tmp_path, text) == [("gateway.statedir", "unknown key (did you mean state_dir?)"),
                                        ("gateway.state_dir", "missing required key")]


@pytest.mark.parametrize("section", ["policy", "masking", "approvals"])
def test_later_sections_are_not_accepted_yet(tmp_path: Path, section: str) -> None:
    assert_problem(tmp_path, GATEWAY + f"[{section}]\nx = 1\n", section,
                   "unknown key (this section is not supported by this version yet)")


@pytest.mark.parametrize(("text", "path", "phrase"), [
    ("", "gateway", "missing required table"),
    ("gateway = 1\n", "gateway", "expected a table, got an integer"),
    ('[gateway]\nstate_dir = "s"\n', "gateway.id", "missing required key"),
    ('[gateway]\nid = "gw"\n', "gateway.state_dir", "missing required key"),
    (GATEWAY + "[ca]\n", "ca.dir", "missing required key"),
    (GATEWAY + CA + '[[identity.providers]]\nissuer = "https://a.example"\naudience = "x"\n'
     "allow_any_subject = true",
     "identity.providers[0].name", "missing required key"),
    (GATEWAY + CA + '[[identity.providers]]\nname = "a"\naudience = "x"\nallow_any_subject = true',
     "identity.providers[0].issuer", "missing required key"),
    (GATEWAY + CA + '[[identity.providers]]\nname = "a"\nissuer = "https://a.example"\n'
     "allow_any_subject = true",
     "identity.providers[0].audience", "missing required key"),
    (GATEWAY + CA + provider('[[identity.providers.claim_mappings]]\nclaim = "a"\nvalue = "b"'),
     "identity.providers[0].claim_mappings[0].groups", "missing required key"),
    (GATEWAY + CA + provider('[[identity.providers.claim_mappings]]\nvalue = "b"\ngroups = ["g"]'),
     "identity.providers[0].claim_mappings[0].claim", "missing required key"),
])
def test_missing_required(tmp_path: Path, text: str, path: str, phrase: str) -> None:
    assert_problem(tmp_path, text, path, phrase)


def test_ca_is_required_when_providers_exist(tmp_path: Path) -> None:
    assert_problem(tmp_path, GATEWAY + provider(), "ca", "nothing could mint")
    assert check(tmp_path, GATEWAY + "[identity]\nproviders = []\n").ok  # no providers, no CA needed


# --- types, strings -------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "path", "phrase"), [
    (GATEWAY + "[control]\nrate_per_identity = true\n", "control.rate_per_identity",
     "expected an integer, got a boolean"),
    (GATEWAY + "[control]\nrate_per_address = '60'\n", "control.rate_per_address",
     "expected an integer, got a string"),
    (GATEWAY + "[control]\nrate_per_address = 6.0\n", "control.rate_per_address",
     "expected an integer, got a float"),
    ('[gateway]\nid = 7\nstate_dir = "s"\n', "gateway.id", "expected a string, got an integer"),
    ('[gateway]\nid = "gw"\nstate_dir = ["s"]\n', "gateway.state_dir", "expected a string, got an array"),
    (GATEWAY + "[control]\nlisten = 2024-01-01T00:00:00Z\n", "control.listen", "got a date-time"),
    (GATEWAY + "[control]\nadmin_groups = 'admins'\n", "control.admin_groups",
     "expected an array of strings, got a string"),
    (GATEWAY + "[control]\nadmin_groups = ['a', 1]\n", "control.admin_groups[1]",
     "expected a string, got an integer"),
    (GATEWAY + "[control]\nmax_body = true\n", "control.max_body", "expected a size"),
    (GATEWAY + "[control]\nmax_body = 1.5\n", "control.max_body", "expected a size"),
    (GATEWAY + CA + provider('allow_any_subject = "true"', who=""), "identity.providers[0].allow_any_subject",
     "expected a boolean"),
    (GATEWAY + CA + provider("leeway = true"), "identity.providers[0].leeway", "expected a duration"),
    (GATEWAY + CA + provider("leeway = 1979-05-27"), "identity.providers[0].leeway", "got a date"),
    (GATEWAY + CA + provider("leeway = 07:32:00"), "identity.providers[0].leeway", "got a time"),
    ("identity = []\n" + GATEWAY, "identity", "expected a table, got an array"),
    (GATEWAY + "[identity]\nproviders = 1\n", "identity.providers", "expected an array of tables"),
    (GATEWAY + "[identity]\nproviders = ['corp']\n", "identity.providers[0]",
     "expected a table, got a string"),
])
def test_wrong_types(tmp_path: Path, text: str, path: str, phrase: str) -> None:
    assert_problem(tmp_path, text, path, phrase)


@pytest.mark.parametrize(("value", "phrase"), [
    ('""', "must not be empty"),
    ('"   "', "must not be empty"),
    ('" gw"', "leading or trailing whitespace"),
    ('"gw\\n"', "control characters"),
    ('"-gw"', "must be 1 to 63 lower-case letters"),
    ('"GW"', "must be 1 to 63 lower-case letters"),
    ('"' + "g" * 64 + '"', "must be 1 to 63 lower-case letters"),
])
def test_bad_gateway_id(tmp_path: Path, value: str, phrase: str) -> None:
    assert_problem(tmp_path, f'[gateway]\nid = {value}\nstate_dir = "s"\n', "gateway.id", phrase)


def test_empty_and_tilde_paths(tmp_path: Path) -> None:
    text = '[gateway]\nid = "gw"\nstate_dir = {}\n'
    assert_problem(tmp_path, text.format('""'), "gateway.state_dir", "must not be empty")
    assert_problem(tmp_path, text.format('"~/s"'), "gateway.state_dir", "not expanded")


def test_empty_strings_in_provider(tmp_path: Path) -> None:
    text = GATEWAY + CA + provider('subject_claim = ""', 'groups_claim = ""', 'allowed_groups = [""]')
    assert problems(tmp_path, text) == [
        ("identity.providers[0].subject_claim", "must not be empty"),
        ("identity.providers[0].groups_claim", "must not be empty"),
        ("identity.providers[0].allowed_groups[0]", "must not be empty"),
    ]


def test_secret_values_are_never_echoed(tmp_path: Path) -> None:
    marker = "s3cr3t-marker"
    text = f"""
[gateway]
id = "{marker}!"
state_dir = 5
"{marker}" = "{marker}"
[control]
listen = "{marker}"
max_body = "{marker}"
[ca]
dir = "certs"
trust_domain = "{marker}_"
[[identity.providers]]
name = "corp"
issuer = "https://user:{marker}@login.example.com"
audience = "l4proxy\\u0000{marker}"
jwks = {{ url = "http://{marker}.example.com/jwks" }}
algorithms = ["{marker}"]
leeway = "{marker}"
allowed_email_domains = ["@{marker}"]
"""
    result = check(tmp_path, text)
    assert len(result.problems) >= 11
    rendered = "\n".join(str(p) for p in result.problems)
    # the only place the marker may appear is as a key name (keys are not secrets)
    assert rendered.count(marker) == 1, rendered
    assert f'gateway."{marker}": unknown key' in rendered or f"gateway.{marker}: unknown key" in rendered


# --- control --------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("127.0.0.1:8443", ("127.0.0.1", 8443)),
    ("[::1]:8443", ("::1", 8443)),
    ("[::]:0", ("::", 0)),
    ("localhost:65535", ("localhost", 65535)),
    ("gw.example.com:443", ("gw.example.com", 443)),
    ("0.0.0.0:443", ("0.0.0.0", 443)),
])
def test_good_addresses(tmp_path: Path, value: str, expected: tuple[str, int]) -> None:
    config = load_config(write(tmp_path, GATEWAY + f'[control]\nlisten = "{value}"\n'))
    assert config.control.listen == expected


@pytest.mark.parametrize(("value", "phrase"), [
    ("127.0.0.1", "missing ':PORT'"),
    ("127.0.0.1:99999", "the port must be"),
    ("127.0.0.1:-1", "the port must be"),
    ("127.0.0.1:http", "the port must be"),
    (":8443", "missing HOST"),
    ("::1:8443", "IPv6 address must be in brackets"),
    ("[::1]8443", "missing ']:PORT'"),
    ("[::1", "missing ']:PORT'"),
    ("[gw.example.com]:8443", "not an IPv6 address"),
    ("999.1.1.1:80", "not an IPv4 address"),
    ("bad_host:80", "not a host name"),
])
def test_bad_addresses(tmp_path: Path, value: str, phrase: str) -> None:
    p = only_problem(tmp_path, GATEWAY + f'[control]\nops_listen = "{value}"\n')
    assert p.path == "control.ops_listen"
    assert p.message.startswith("expected HOST:PORT or [IPv6]:PORT") and phrase in p.message


def test_control_values(tmp_path: Path) -> None:
    text = GATEWAY + """
[control]
listen = "[::1]:8443"
ops_listen = "127.0.0.1:0"
admin_groups = ["ops", "sec"]
rate_per_identity = 1
rate_per_address = 1000
max_body = "1MiB"
"""
    c = load_config(write(tmp_path, text)).control
    assert c == ControlConfig(listen=("::1", 8443), ops_listen=("127.0.0.1", 0), admin_groups=("ops", "sec"),
                              rate_per_identity=1, rate_per_address=1000, max_body=1 << 20)


@pytest.mark.parametrize(("line", "path", "phrase"), [
    ('listen = "127.0.0.1:9090"', "control.listen", "same address as control.ops_listen (its default)"),
    ('listen = "[::1]:1"\nops_listen = "[::1]:1"', "control.ops_listen", "same address as control.listen"),
    ('admin_groups = ["a", "b", "a"]', "control.admin_groups[2]", "duplicate entry (same as [0])"),
    ("rate_per_identity = 0", "control.rate_per_identity", "must be at least 1"),
    ('max_body = "512"', "control.max_body", "from 1KiB to 1MiB"),
    ('max_body = "2MiB"', "control.max_body", "from 1KiB to 1MiB"),
    ('max_body = "lots"', "control.max_body", "not a size"),
])
def test_control_rules(tmp_path: Path, line: str, path: str, phrase: str) -> None:
    assert_problem(tmp_path, GATEWAY + "[control]\n" + line + "\n", path, phrase)


def test_port_zero_twice_is_not_a_duplicate(tmp_path: Path) -> None:
    assert check(tmp_path, GATEWAY + '[control]\nlisten = "127.0.0.1:0"\nops_listen = "127.0.0.1:0"\n').ok


# --- ca -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "path", "phrase"), [
    ('breakglass_max_ttl = "2h"', "ca.breakglass_max_ttl", "at most 1h"),
    ('breakglass_max_ttl = "0s"', "ca.breakglass_max_ttl", "more than 0s"),
    ('breakglass_max_ttl = "soon"', "ca.breakglass_max_ttl", "not a duration"),
    ('trust_domain = "L4proxy.local"', "ca.trust_domain", "DNS-like name"),
    ('trust_domain = "l4proxy..local"', "ca.trust_domain", "DNS-like name"),
    ('trust_domain = "l4proxy/x"', "ca.trust_domain", "DNS-like name"),
    ('trust_domain = "-l4proxy.local"', "ca.trust_domain", "DNS-like name"),
    ('dir = ""', "ca.dir", "must not be empty"),
])
def test_ca_rules(tmp_path: Path, line: str, path: str, phrase: str) -> None:
    text = GATEWAY + "[ca]\n" + (line if line.startswith("dir") else 'dir = "certs"\n' + line) + "\n"
    assert_problem(tmp_path, text, path, phrase)


def test_ca_values(tmp_path: Path) -> None:
    text = GATEWAY + '[ca]\ndir = "pki"\ntrust_domain = "gw.acme-corp.example"\nbreakglass_max_ttl = "30m"\n'
    assert load_config(write(tmp_path, text)).ca == CaConfig(dir=tmp_path / "pki",
                                                              trust_domain="gw.acme-corp.example",
                                                              breakglass_max_ttl=1800.0)


# --- identity providers ---------------------------------------------------------------------

P0 = "identity.providers[0]"


def test_provider_declaring_nobody_is_a_problem(tmp_path: Path) -> None:
    p = only_problem(tmp_path, GATEWAY + CA + provider(who=""))
    assert p.path == P0
    assert p.message == ("declares nobody who may enroll: set bound_claims, allowed_email_domains or "
                         "allowed_groups (or allow_any_subject = true)")
    # empty declarations declare nobody either
    empty = provider("allowed_groups = []", "[identity.providers.bound_claims]", who="")
    assert_problem(tmp_path, GATEWAY + CA + empty, P0, "declares nobody")


def test_allow_any_subject_is_a_warning(tmp_path: Path) -> None:
    result = check(tmp_path, GATEWAY + CA + provider("allow_any_subject = true", who=""))
    assert result.problems == ()
    assert result.warnings == (Problem(f"{P0}.allow_any_subject",
                                       "any subject of this issuer and audience may enroll"),)
    assert result.config is not None and result.config.providers[0].allow_any_subject


def test_allow_any_subject_with_constraints_is_a_problem(tmp_path: Path) -> None:
    assert_problem(tmp_path, GATEWAY + CA + provider("allow_any_subject = true"), f"{P0}.allow_any_subject",
                   "cannot be combined")


@pytest.mark.parametrize("who", [
    'allowed_email_domains = ["example.com"]',
    'allowed_groups = ["eng"]\ngroups_claim = "groups"',
    '[identity.providers.bound_claims]\nhd = "example.com"',
])
def test_any_one_constraint_is_enough(tmp_path: Path, who: str) -> None:
    result = check(tmp_path, GATEWAY + CA + provider(who=who))
    assert result.ok and result.warnings == ()


def test_invalid_constraint_does_not_also_report_nobody(tmp_path: Path) -> None:
    assert problems(tmp_path, GATEWAY + CA + provider(who="allowed_email_domains = 5")) == [
        (f"{P0}.allowed_email_domains", "expected an array of strings, got an integer")]


def test_allowed_groups_need_a_source_of_groups(tmp_path: Path) -> None:
    assert_problem(tmp_path, GATEWAY + CA + provider(who='allowed_groups = ["eng"]'), f"{P0}.allowed_groups",
                   "set groups_claim or claim_mappings")
    mapping = '[[identity.providers.claim_mappings]]\nclaim = "repo"\nvalue = "a/b"\ngroups = ["eng"]'
    mapped = provider(mapping, who='allowed_groups = ["eng"]')
    assert check(tmp_path, GATEWAY + CA + mapped).ok


def test_duplicate_provider_names(tmp_path: Path) -> None:
    text = GATEWAY + CA + provider() + provider(name="other") + provider()
    assert problems(tmp_path, text) == [
        ("identity.providers[2].name", "duplicate provider name (same as identity.providers[0].name)")]


@pytest.mark.parametrize(("name", "phrase"), [
    ("breakglass", "reserved name"),
    ("Corp", "1 to 32 lower-case letters"),
    ("1corp", "1 to 32 lower-case letters"),
    ("c" * 33, "1 to 32 lower-case letters"),
    ("corp/x", "1 to 32 lower-case letters"),
])
def test_bad_provider_names(tmp_path: Path, name: str, phrase: str) -> None:
    assert_problem(tmp_path, GATEWAY + CA + provider(name=name), f"{P0}.name", phrase)


def test_provider_name_matches_the_identity_model() -> None:
    from l4proxy.identity._model import PROVIDER_NAME
    assert PROVIDER_NAME.fullmatch("c" + "-" * 31) and not PROVIDER_NAME.fullmatch("c" * 33)


@pytest.mark.parametrize(("issuer", "phrase"), [
    ("http://login.example.com", "must be https://"),
    ("http://10.0.0.1:8080", "must be https://"),
    ("http://127.example.com", "must be https://"),
    ("ftp://login.example.com", "must be an https:// URL"),
    ("HTTPS://login.example.com", "must be an https:// URL"),
    ("login.example.com", "must be an https:// URL"),
    ("https://", "must name a host"),
    ("https://login.example.com?tenant=1", "must not have a query or fragment"),
    ("https://login.example.com#x", "must not have a query or fragment"),
    ("https://user:pw@login.example.com", "must not contain credentials"),
    ("https://login.example.com:99999", "not a valid URL"),
    ("https://login.example .com", "must not contain whitespace"),
])
def test_bad_issuers(tmp_path: Path, issuer: str, phrase: str) -> None:
    text = GATEWAY + CA + provider().replace("https://login.example.com", issuer)
    assert_problem(tmp_path, text, f"{P0}.issuer", phrase)


@pytest.mark.parametrize("issuer", ["http://127.0.0.1:9000", "http://127.1.2.3", "http://[::1]:9000",
                                    "http://localhost:9000/realms/dev", "https://login.example.com/tenant/"])
def test_good_issuers(tmp_path: Path, issuer: str) -> None:
    text = GATEWAY + CA + provider().replace("https://login.example.com", issuer)
    assert load_config(write(tmp_path, text)).providers[0].issuer == issuer


@pytest.mark.parametrize(("jwks", "path", "phrase"), [
    ('"https://x.example/jwks"', "jwks", 'must be "discovery"'),
    ("5", "jwks", 'must be "discovery"'),
    ("{}", "jwks", "set exactly one of url or file"),
    ('{ url = "https://x.example/j", file = "j.json" }', "jwks", "set exactly one of url or file"),
    ('{ url = "http://x.example/j" }', "jwks.url", "must be https://"),
    ('{ url = "https://u:p@x.example/j" }', "jwks.url", "must not contain credentials"),
    ('{ url = "https://x.example/j#k" }', "jwks.url", "must not have a fragment"),
    ('{ url = 5 }', "jwks.url", "expected a string"),
    ('{ file = "" }', "jwks.file", "must not be empty"),
])
def test_bad_jwks(tmp_path: Path, jwks: str, path: str, phrase: str) -> None:
    assert_problem(tmp_path, GATEWAY + CA + provider(f"jwks = {jwks}"), f"{P0}.{path}", phrase)


@pytest.mark.parametrize(("jwks", "kind", "location"), [
    ('"discovery"', JwksSourceKind.DISCOVERY, None),
    ('{ url = "https://x.example/jwks?v=2" }', JwksSourceKind.URL, "https://x.example/jwks?v=2"),
    ('{ url = "http://127.0.0.1:9000/jwks" }', JwksSourceKind.URL, "http://127.0.0.1:9000/jwks"),
    ('{ file = "/etc/idp/jwks.json" }', JwksSourceKind.FILE, "/etc/idp/jwks.json"),
])
def test_good_jwks(tmp_path: Path, jwks: str, kind: JwksSourceKind, location: str | None) -> None:
    (p,) = load_config(write(tmp_path, GATEWAY + CA + provider(f"jwks = {jwks}"))).providers
    assert (p.jwks_source, p.jwks_location) == (kind, location)


@pytest.mark.parametrize(("line", "path", "phrase"), [
    ('algorithms = ["HS256"]', "algorithms[0]", "not allowed (choose from EdDSA, ES256, PS256, RS256)"),
    ('algorithms = ["RS256", "none"]', "algorithms[1]", "not allowed"),
    ('algorithms = ["rs256"]', "algorithms[0]", "not allowed"),
    ("algorithms = []", "algorithms", "must not be empty"),
    ('algorithms = ["ES256", "ES256"]', "algorithms[1]", "duplicate entry (same as [0])"),
    ('max_cert_ttl = "25h"', "max_cert_ttl", "at most 24h"),
    ('default_cert_ttl = "48h"', "default_cert_ttl", "at most 24h"),
    ('default_cert_ttl = "2h"', "default_cert_ttl", f"must not exceed {P0}.max_cert_ttl"),
    ('max_cert_ttl = "5m"', "default_cert_ttl", f"must not exceed {P0}.max_cert_ttl"),
    ("default_cert_ttl = 0", "default_cert_ttl", "more than 0s"),
    ('default_cert_ttl = "-5m"', "default_cert_ttl", "not a duration"),
    ("default_cert_ttl = -300", "default_cert_ttl", "not a duration"),
    ("default_cert_ttl = nan", "default_cert_ttl", "not a duration"),
    ("max_token_age = inf", "max_token_age", "not a duration"),
    ('leeway = "6m"', "leeway", "at most 5m"),
    ('max_token_lifetime = "0s"', "max_token_lifetime", "more than 0s"),
    ('max_token_bytes = "2MiB"', "max_token_bytes", "from 1 byte to 1MiB"),
    ("max_token_bytes = 0", "max_token_bytes", "from 1 byte to 1MiB"),
    ('jwks_min_cache = "2d"', "jwks_min_cache", f"must not exceed {P0}.jwks_max_cache"),
    ('jwks_refetch_interval = "0s"', "jwks_refetch_interval", "more than 0s"),
    ('fetch_timeout = "10 s"', "fetch_timeout", "not a duration"),
    ('fetch_timeout = "10s\\n"', "fetch_timeout", "not a duration"),
    ('allowed_email_domains = ["example.com", "EXAMPLE.com"]', "allowed_email_domains[1]", "duplicate entry"),
    ('allowed_email_domains = ["@example.com"]', "allowed_email_domains[0]", "without '@'"),
    ('allowed_email_domains = ["localhost"]', "allowed_email_domains[0]", "a domain name like example.com"),
    ('allowed_groups = ["eng", "eng"]\ngroups_claim = "groups"', "allowed_groups[1]", "duplicate entry"),
])
def test_provider_rules(tmp_path: Path, line: str, path: str, phrase: str) -> None:
    lines = line.split("\n")
    who = lines[0] if line.startswith("allowed_email_domains") else 'allowed_email_domains = ["example.com"]'
    extra = lines[1:] if line.startswith("allowed_email_domains") else lines
    assert_problem(tmp_path, GATEWAY + CA + provider(*extra, who=who), f"{P0}.{path}", phrase)


def test_provider_values(tmp_path: Path) -> None:
    text = GATEWAY + CA + provider(
        'subject_claim = "email"', 'groups_claim = "roles"', 'allowed_groups = ["eng"]',
        'algorithms = ["ES256"]', 'max_cert_ttl = "24h"', 'default_cert_ttl = "24h"', 'leeway = "5m"',
        'jwks_min_cache = "24h"', 'jwks_max_staleness = 0',
        who='allowed_email_domains = ["Example.COM", "corp.example.org"]')
    (p,) = load_config(write(tmp_path, text)).providers
    assert p.subject_claim == "email" and p.groups_claim == "roles"
    assert p.allowed_email_domains == ("example.com", "corp.example.org")  # folded to lower case
    assert p.algorithms == ("ES256",)
    assert p.max_cert_ttl == p.default_cert_ttl == HARD_MAX_CERT_TTL
    assert (p.leeway, p.jwks_min_cache, p.jwks_max_staleness) == (300.0, 86400.0, 0.0)


def test_bound_claims(tmp_path: Path) -> None:
    text = GATEWAY + CA + provider("""
[identity.providers.bound_claims]
repository_owner = "acme"
ref = ["refs/heads/main", "refs/tags/v*"]
"https://example.com/claims/org" = "acme"
""", who="")
    (p,) = load_config(write(tmp_path, text)).providers
    assert p.bound_claims == (
        ("https://example.com/claims/org", ("acme",)),
        ("ref", ("refs/heads/main", "refs/tags/v*")),
        ("repository_owner", ("acme",)),
    )


@pytest.mark.parametrize(("body", "path", "phrase"), [
    ("owner = []", "bound_claims.owner", "must not be empty"),
    ("owner = 5", "bound_claims.owner", "expected a string or an array of strings, got an integer"),
    ('owner = ["a", "a"]', "bound_claims.owner[1]", "duplicate entry"),
    ('owner = ""', "bound_claims.owner", "must not be empty"),
    ('owner.name = "a"', "bound_claims.owner", "got a table"),
    ('"" = "a"', 'bound_claims.""', "claim name must be non-empty"),
    ('"org.id" = 1', 'bound_claims."org.id"', "expected a string or an array"),
])
def test_bad_bound_claims(tmp_path: Path, body: str, path: str, phrase: str) -> None:
    text = GATEWAY + CA + provider("[identity.providers.bound_claims]\n" + body)
    assert_problem(tmp_path, text, f"{P0}.{path}", phrase)
    assert_problem(tmp_path, GATEWAY + CA + provider("bound_claims = 5"), f"{P0}.bound_claims",
                   "expected a table of claim = value(s)")


def test_match_everything_bound_claim_is_a_warning(tmp_path: Path) -> None:
    text = GATEWAY + CA + provider('[identity.providers.bound_claims]\nowner = ["acme", "**"]', who="")
    result = check(tmp_path, text)
    assert result.ok
    assert result.warnings == (Problem(f"{P0}.bound_claims.owner",
                                       "matches every value: it only requires the claim to be present"),)


def test_claim_mappings(tmp_path: Path) -> None:
    mappings = """
[[identity.providers.claim_mappings]]
claim = "repository"
value = "acme/app"
groups = ["ci-app"]
[[identity.providers.claim_mappings]]
claim = "repository"
value = "acme/etl"
groups = ["ci-etl", "writers"]
"""
    (p,) = load_config(write(tmp_path, GATEWAY + CA + provider(mappings))).providers
    assert p.claim_mappings == (
        ClaimMapping(claim="repository", value="acme/app", groups=("ci-app",)),
        ClaimMapping(claim="repository", value="acme/etl", groups=("ci-etl", "writers")),
    )
    dup = mappings.replace("acme/etl", "acme/app")
    assert_problem(tmp_path, GATEWAY + CA + provider(dup), f"{P0}.claim_mappings[1]",
                   f"duplicate mapping (same claim and value as {P0}.claim_mappings[0])")
    empty = mappings.replace('["ci-app"]', "[]")
    assert_problem(tmp_path, GATEWAY + CA + provider(empty), f"{P0}.claim_mappings[0].groups",
                   "must not be empty")
    assert_problem(tmp_path, GATEWAY + CA + provider("claim_mappings = 1"), f"{P0}.claim_mappings",
                   "expected an array of tables")


def test_problems_in_second_provider_are_indexed(tmp_path: Path) -> None:
    text = GATEWAY + CA + provider() + provider("leeway = '1h'", name="ci")
    assert_problem(tmp_path, text, "identity.providers[1].leeway", "at most 5m")


# --- the data path: limits, targets, listeners ---------------------------------------------

T0 = "targets[0]"
L0 = "listeners[0]"
KEY_ENV = "L4PROXY_TEST_CHUNKD_KEY"
NARROW_SCOPE = '[targets.credential_scope]\nbuckets = ["data"]\ntables = ["events"]\naccess = ["read"]'
SCOPE_WARNING = ("declare credential_scope (chunkd reports it in WELCOME) so config check can tell whether "
                 "the credential is broader than needed")


@pytest.fixture(autouse=True)
def _credential_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The env credential the ``target`` blocks use is set (a value no message may show)."""
    monkeypatch.setenv(KEY_ENV, "env-secret-value")


def target(*lines: str, name: str = "chunks", upstream: str = "127.0.0.1:7070",
           credential: str = f'credential = {{ env = "{KEY_ENV}" }}', access: str = 'groups = ["eng"]',
           scope: str = NARROW_SCOPE) -> str:
    """One [[targets]] block: a valid, warning-free cwp target, plus ``lines`` (top-level keys)."""
    body = "\n".join(lines)
    return f"""
[[targets]]
name = "{name}"
upstream = "{upstream}"
{credential}
{body}
[targets.access]
{access}
{scope}
"""


def tcp_target(*lines: str, name: str = "cache") -> str:
    return target('protocol = "tcp"', *lines, name=name, upstream="127.0.0.1:6379", credential="", scope="")


def listener(*lines: str, name: str = "main", listen: str = "127.0.0.1:7443",
             targets: str = '["chunks"]') -> str:
    body = "\n".join(lines)
    return f"""
[[listeners]]
name = "{name}"
listen = "{listen}"
server_cert = "certs/server.crt"
server_key = "certs/server.key"
client_ca = "certs/bundle.pem"
targets = {targets}
{body}
"""


DATA = GATEWAY + target() + listener()


def only_warning(tmp_path: Path, text: str) -> Problem:
    result = check(tmp_path, text)
    assert result.problems == ()
    assert len(result.warnings) == 1, result.warnings
    return result.warnings[0]


def test_data_path_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GATEWAY))
    assert config.limits == LimitsConfig() and config.targets == () and config.listeners == ()
    result = check(tmp_path, DATA)
    assert result.problems == () and result.warnings == ()
    assert result.config is not None
    (t,) = result.config.targets
    assert t == TargetConfig(name="chunks", upstream=("127.0.0.1", 7070), credential_env=KEY_ENV,
                             access=AccessRule(groups=("eng",)),
                             credential_scope=DeclaredScope(buckets=("data",), tables=("events",),
                                                            access=("read",)))
    assert t.protocol is TargetProtocol.CWP and t.client_credentials is ClientCredentials.REFUSE
    assert not t.upstream_tls and t.server_names == ()
    (ln,) = result.config.listeners
    assert ln.targets == ("chunks",) and ln.client_ca == tmp_path / "certs" / "bundle.pem"


# -- limits --


def test_limits_values(tmp_path: Path) -> None:
    text = GATEWAY + """
[limits]
handshake_timeout = "5s"
idle_timeout = "1m"
max_sessions = 1
max_session_length = "1h"
upstream_connect_timeout = 2.5
read_size = "4KiB"
max_buffered = "4KiB"
max_cert_lifetime = "1h"
expiry_notice = "59m"
expiry_grace = "0s"
drain_timeout = "10s"
"""
    assert load_config(write(tmp_path, text)).limits == LimitsConfig(
        handshake_timeout=5.0, idle_timeout=60.0, max_sessions=1, max_session_length=3600.0,
        upstream_connect_timeout=2.5, read_size=4096, max_buffered=4096, max_cert_lifetime=3600.0,
        expiry_notice=3540.0, expiry_grace=0.0, drain_timeout=10.0)
    text = GATEWAY + '[limits]\nread_size = "16MiB"\nmax_buffered = "64MiB"\nexpiry_grace = "30s"\n'
    limits = load_config(write(tmp_path, text)).limits
    assert (limits.read_size, limits.max_buffered, limits.expiry_grace) == (16 << 20, 64 << 20, 30.0)


@pytest.mark.parametrize(("max_buffered", "read_size"), [
    ("512KiB", 512 << 10), ("128KiB", 128 << 10), ("4MiB", LimitsConfig().read_size)])
def test_read_size_left_out_never_exceeds_max_buffered(tmp_path: Path, max_buffered: str,
                                                       read_size: int) -> None:
    # the default read size (1MiB) gives way to a smaller max_buffered: a configuration
    # written when the default was 256KiB still loads
    limits = load_config(write(tmp_path, GATEWAY + f'[limits]\nmax_buffered = "{max_buffered}"\n')).limits
    assert limits.read_size == read_size


@pytest.mark.parametrize("key", ["handshake_timeout", "idle_timeout", "max_session_length",
                                 "upstream_connect_timeout", "max_cert_lifetime", "expiry_notice",
                                 "drain_timeout"])
def test_limits_durations_must_be_positive(tmp_path: Path, key: str) -> None:
    assert_problem(tmp_path, GATEWAY + f'[limits]\n{key} = "0s"\n', f"limits.{key}", "must be more than 0s")


@pytest.mark.parametrize(("lines", "path", "phrase"), [
    ('expiry_notice = "8h"', "limits.expiry_notice",
     "must be less than limits.max_session_length (its default)"),
    ('expiry_notice = "2h"\nmax_session_length = "1h"', "limits.expiry_notice",
     "must be less than limits.max_session_length"),
    ('max_session_length = "60s"', "limits.max_session_length",
     "must be more than limits.expiry_notice (its default)"),
    ('read_size = "2KiB"', "limits.read_size", "must be from 4KiB to 16MiB"),
    ('read_size = "32MiB"', "limits.read_size", "must be from 4KiB to 16MiB"),
    ('max_buffered = "128MiB"', "limits.max_buffered", "must be from 4KiB to 64MiB"),
    ('read_size = "256KiB"\nmax_buffered = "128KiB"', "limits.read_size",
     "must not exceed limits.max_buffered"),
    ('read_size = "2MiB"', "limits.read_size", "must not exceed limits.max_buffered (its default)"),
    ('read_size = "64KiB"\nmax_buffered = "32KiB"', "limits.read_size",
     "must not exceed limits.max_buffered"),
    ("max_sessions = 0", "limits.max_sessions", "must be at least 1"),
    ('max_sessions = "many"', "limits.max_sessions", "expected an integer"),
    ('max_cert_lifetime = "25h"', "limits.max_cert_lifetime", "at most 24h"),
    ('expiry_grace = "-1s"', "limits.expiry_grace", "not a duration"),
    ("idle_timeout = true", "limits.idle_timeout", "expected a duration"),
    ("colour = 1", "limits.colour", "unknown key"),
])
def test_limits_rules(tmp_path: Path, lines: str, path: str, phrase: str) -> None:
    assert_problem(tmp_path, GATEWAY + "[limits]\n" + lines + "\n", path, phrase)


# -- targets --


def test_target_values(tmp_path: Path) -> None:
    key = tmp_path / "secrets" / "chunkd.key"
    key.parent.mkdir()
    key.touch(mode=0o600)
    key.chmod(0o600)
    text = GATEWAY + target(
        "upstream_tls = true", 'upstream_ca = "certs/up-ca.pem"', 'upstream_server_name = "ChunkD.Internal"',
        'client_credentials = "strip"', 'server_names = ["Chunks.GW.example", "c.gw.example"]',
        upstream="[::1]:7070", credential='credential = { file = "secrets/chunkd.key" }',
        access='identities = ["corp/alice", "ci/acme/*"]\ngroups = ["eng", "ops"]')
    result = check(tmp_path, text + listener())
    assert result.problems == () and result.warnings == ()
    assert result.config is not None
    assert result.config.targets == (TargetConfig(
        name="chunks", upstream=("::1", 7070), protocol=TargetProtocol.CWP, upstream_tls=True,
        upstream_ca=tmp_path / "certs" / "up-ca.pem", upstream_server_name="chunkd.internal",
        credential_file=key, client_credentials=ClientCredentials.STRIP,
        server_names=("chunks.gw.example", "c.gw.example"),
        access=AccessRule(identities=("corp/alice", "ci/acme/*"), groups=("eng", "ops")),
        credential_scope=DeclaredScope(buckets=("data",), tables=("events",), access=("read",))),)


@pytest.mark.parametrize(("text", "path", "phrase"), [
    (target().replace('name = "chunks"\n', ""), f"{T0}.name", "missing required key"),
    (target().replace('upstream = "127.0.0.1:7070"\n', ""), f"{T0}.upstream", "missing required key"),
    (target(name="Chunks"), f"{T0}.name",
     "must be 1 to 32 lower-case letters, digits and '-', starting with a letter"),
    (target(name="c" * 33), f"{T0}.name", "1 to 32 lower-case letters"),
    (target(upstream="127.0.0.1"), f"{T0}.upstream", "expected HOST:PORT or [IPv6]:PORT: missing ':PORT'"),
    (target(upstream="127.0.0.1:0"), f"{T0}.upstream", "port 0 is not a destination"),
    (target('protocol = "http"'), f"{T0}.protocol", 'must be "cwp" or "tcp"'),
    (target('upstream_tls = "yes"'), f"{T0}.upstream_tls", "expected a boolean"),
    (target('upstream_ca = "ca.pem"'), f"{T0}.upstream_ca", "only applies with upstream_tls = true"),
    (target("upstream_tls = false", 'upstream_server_name = "x.internal"'), f"{T0}.upstream_server_name",
     "only applies with upstream_tls = true"),
    (target("upstream_tls = true", 'upstream_server_name = "*.internal"'), f"{T0}.upstream_server_name",
     "a DNS name like chunks.gw.example"),
    (target('client_credentials = "allow"'), f"{T0}.client_credentials", 'must be "refuse" or "strip"'),
    (target('server_names = ["a.example", "A.example"]'), f"{T0}.server_names[1]", "duplicate entry"),
    (target('server_names = ["a_b.example"]'), f"{T0}.server_names[0]", "a DNS name"),
    (target("colour = 1"), f"{T0}.colour", "unknown key"),
])
def test_target_rules(tmp_path: Path, text: str, path: str, phrase: str) -> None:
    assert_problem(tmp_path, GATEWAY + text + listener(), path, phrase)


def test_duplicate_target_names(tmp_path: Path) -> None:
    text = GATEWAY + target() + target() + listener()
    assert problems(tmp_path, text) == [("targets[1].name",
                                         "duplicate target name (same as targets[0].name)")]


# -- the credential --


def test_cwp_target_needs_a_credential(tmp_path: Path) -> None:
    assert_problem(tmp_path, GATEWAY + target(credential="") + listener(), f"{T0}.credential",
                   "missing required key: a cwp target needs the service's credential")


FORM = 'must be { file = "PATH" } or { env = "VARIABLE" }'


@pytest.mark.parametrize(("credential", "path", "phrase"), [
    ('credential = "{m}"', f"{T0}.credential",
     f"{FORM}: the credential itself never goes in the configuration"),
    ("credential = 12345", f"{T0}.credential", f"{FORM}, got an integer"),
    ('credential = ["{m}"]', f"{T0}.credential", "got an array"),
    ("credential = {{}}", f"{T0}.credential", "set exactly one of file or env"),
    ('credential = {{ file = "k", env = "K" }}', f"{T0}.credential", "set exactly one of file or env"),
    ('credential = {{ env = "{m}-1" }}', f"{T0}.credential.env", "must be an environment variable name"),
    ('credential = {{ env = "{m}\\n" }}', f"{T0}.credential.env", "control characters"),
    ('credential = {{ file = "" }}', f"{T0}.credential.file", "must not be empty"),
    ('credential = {{ file = "~/{m}" }}', f"{T0}.credential.file", "not expanded"),
    ('credential = {{ key = "{m}" }}', f"{T0}.credential.key", "unknown key"),
])
def test_bad_credentials_never_echo_the_value(tmp_path: Path, credential: str, path: str,
                                              phrase: str) -> None:
    marker = "sk-l1ve-s3cr3t-marker"
    text = GATEWAY + target(credential=credential.format(m=marker)) + listener()
    result = check(tmp_path, text)
    rendered = "\n".join(str(p) for p in result.problems + result.warnings)
    assert marker not in rendered, rendered
    assert [p.path for p in result.problems][:1] == [path], rendered
    assert phrase in result.problems[0].message, rendered


def test_credential_file_checks(tmp_path: Path) -> None:
    text = GATEWAY + target(credential='credential = { file = "chunkd.key" }') + listener()
    path = f"{T0}.credential.file"
    # not there yet: a warning (it is read at each upstream connect)
    w = only_warning(tmp_path, text)
    assert w.path == path and w.message.startswith("does not exist yet")
    key = tmp_path / "chunkd.key"
    key.write_text("file-secret-value\n")
    key.chmod(0o640)
    assert_problem(tmp_path, text, path, "accessible by group or others (mode 0640): run chmod 600")
    key.chmod(0o604)
    assert_problem(tmp_path, text, path, "accessible by group or others (mode 0604)")
    key.chmod(0o600)
    result = check(tmp_path, text)
    assert result.ok and result.warnings == ()
    assert result.config is not None and result.config.targets[0].credential_file == key
    key.unlink()
    key.mkdir()
    assert_problem(tmp_path, text, path, "not a regular file")


def test_credential_file_contents_never_appear(tmp_path: Path) -> None:
    key = tmp_path / "chunkd.key"
    key.write_text("file-secret-marker")
    key.chmod(0o644)
    result = check(tmp_path, GATEWAY + target(credential='credential = { file = "chunkd.key" }') + listener())
    assert not result.ok
    assert "file-secret-marker" not in "\n".join(str(p) for p in result.problems + result.warnings)


def test_unset_credential_env_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    w = only_warning(tmp_path, DATA)
    assert w.path == f"{T0}.credential.env"
    assert w.message.startswith("the environment variable is not set here")
    assert KEY_ENV not in w.message  # the name is not echoed either (it might be the secret itself)
    assert check(tmp_path, DATA).config is not None


# -- connect access --


@pytest.mark.parametrize(("access", "path", "phrase"), [
    (None, f"{T0}.access", "missing required table: it says who may open sessions"),
    ("", f"{T0}.access", "grants nobody: set identities or groups (nobody could connect)"),
    ("identities = []\ngroups = []", f"{T0}.access", "grants nobody"),
    ('identities = ["alice"]', f"{T0}.access.identities[0]", "must be PROVIDER/SUBJECT"),
    ('identities = ["corp/"]', f"{T0}.access.identities[0]", "must be PROVIDER/SUBJECT"),
    ('identities = ["/alice"]', f"{T0}.access.identities[0]", "must be PROVIDER/SUBJECT"),
    ('identities = ["corp/a", "corp/a"]', f"{T0}.access.identities[1]", "duplicate entry"),
    ('groups = "eng"', f"{T0}.access.groups", "expected an array of strings"),
    ('groups = ["eng"]\nroles = ["x"]', f"{T0}.access.roles", "unknown key"),
])
def test_access_rules(tmp_path: Path, access: str | None, path: str, phrase: str) -> None:
    block = target(access=access or "")
    if access is None:
        block = block.replace("[targets.access]\n", "")
    assert_problem(tmp_path, GATEWAY + block + listener(), path, phrase)


@pytest.mark.parametrize("glob", ["*", "**", "*/*"])
def test_access_for_every_identity_is_a_warning(tmp_path: Path, glob: str) -> None:
    w = only_warning(tmp_path, GATEWAY + target(access=f'identities = ["{glob}"]') + listener())
    assert w == Problem(f"{T0}.access.identities[0]",
                        "matches every identity: anyone who can enroll may connect")


# -- the credential's scope --


@pytest.mark.parametrize(("scope", "broad"), [
    ('buckets = ["*"]\naccess = ["read", "write", "admin"]', 'every bucket ("*") and admin access'),
    ('buckets = ["data"]\ntables = ["**"]', 'every table ("**")'),
    ('buckets = ["data", "*"]\ntables = ["*"]\naccess = ["admin"]',
     'every bucket ("*"), every table ("*") and admin access'),
    ('access = ["admin"]', "admin access"),
])
def test_broad_credential_scope_is_a_warning(tmp_path: Path, scope: str, broad: str) -> None:
    text = GATEWAY + target(scope="[targets.credential_scope]\n" + scope) + listener()
    assert only_warning(tmp_path, text) == Problem(
        f"{T0}.credential_scope",
        f"the credential reaches {broad}; give the gateway a key scoped to what its policy grants")


@pytest.mark.parametrize("scope", ['buckets = ["data-*", "b?"]\ntables = ["t*"]\naccess = ["read", "write"]',
                                   ""])
def test_narrow_credential_scope_is_quiet(tmp_path: Path, scope: str) -> None:
    result = check(tmp_path, GATEWAY + target(scope="[targets.credential_scope]\n" + scope) + listener())
    assert result.ok and result.warnings == ()


def test_undeclared_credential_scope_is_a_warning(tmp_path: Path) -> None:
    assert only_warning(tmp_path, GATEWAY + target(scope="") + listener()) == Problem(T0, SCOPE_WARNING)


@pytest.mark.parametrize(("scope", "path", "phrase"), [
    ('access = ["delete"]', "access[0]", "not allowed (choose from admin, read, write)"),
    ('buckets = "*"', "buckets", "expected an array of strings"),
    ('tables = [""]', "tables[0]", "must not be empty"),
    ("owners = []", "owners", "unknown key"),
])
def test_credential_scope_rules(tmp_path: Path, scope: str, path: str, phrase: str) -> None:
    text = GATEWAY + target(scope="[targets.credential_scope]\n" + scope) + listener()
    assert_problem(tmp_path, text, f"{T0}.credential_scope.{path}", phrase)


# -- tcp targets --


def test_tcp_target_needs_no_credential(tmp_path: Path) -> None:
    result = check(tmp_path, GATEWAY + tcp_target() + listener(targets='["cache"]'))
    assert result.ok and result.warnings == ()
    assert result.config is not None and result.config.targets[0].protocol is TargetProtocol.TCP


@pytest.mark.parametrize(("line", "key"), [
    ('client_credentials = "strip"', "client_credentials"),
    ('credential = { file = "nowhere.key" }', "credential"),  # not looked for either
    ("[targets.credential_scope]\naccess = [\"admin\"]", "credential_scope"),
])
def test_tcp_target_ignores_cwp_settings_with_a_warning(tmp_path: Path, line: str, key: str) -> None:
    w = only_warning(tmp_path, GATEWAY + tcp_target(line) + listener(targets='["cache"]'))
    assert w == Problem(f"{T0}.{key}", "has no effect on a tcp target: its bytes are relayed unparsed")


# -- listeners --


def test_listener_values(tmp_path: Path) -> None:
    text = GATEWAY + target('server_names = ["chunks.gw"]') + tcp_target('server_names = ["cache.gw"]') \
        + listener(listen="[::1]:0", targets='["chunks", "cache"]') \
        + listener(name="direct", listen="127.0.0.1:0", targets='["chunks"]')
    result = check(tmp_path, text)
    assert result.problems == () and result.warnings == ()
    assert result.config is not None
    main, direct = result.config.listeners
    assert main == ListenerConfig(name="main", listen=("::1", 0),
                                  server_cert=tmp_path / "certs" / "server.crt",
                                  server_key=tmp_path / "certs" / "server.key",
                                  client_ca=tmp_path / "certs" / "bundle.pem", targets=("chunks", "cache"))
    assert direct.listen == ("127.0.0.1", 0) and direct.targets == ("chunks",)


@pytest.mark.parametrize("key", ["name", "listen", "server_cert", "server_key", "client_ca", "targets"])
def test_listener_required_keys(tmp_path: Path, key: str) -> None:
    block = "\n".join(line for line in listener().splitlines() if not line.startswith(f"{key} ="))
    result = check(tmp_path, GATEWAY + target() + block)
    assert [(p.path, p.message) for p in result.problems] == [(f"{L0}.{key}", "missing required key")]


@pytest.mark.parametrize(("text", "path", "phrase"), [
    (listener(targets="[]"), f"{L0}.targets", "must not be empty"),
    (listener(targets='["chunks", "chunks"]'), f"{L0}.targets[1]", "duplicate entry"),
    (listener(targets='["nope"]'), f"{L0}.targets[0]", "no such target (no [[targets]] entry has this name)"),
    (listener(name="Main"), f"{L0}.name", "1 to 32 lower-case letters"),
    (listener(listen="127.0.0.1:http"), f"{L0}.listen", "the port must be"),
    (listener(listen="127.0.0.1:8443"), f"{L0}.listen", "same address as control.listen (its default)"),
    (listener(listen="127.0.0.1:9090"), f"{L0}.listen", "same address as control.ops_listen (its default)"),
    ('[control]\nops_listen = "[::1]:7443"\n' + listener(listen="[::1]:7443"), f"{L0}.listen",
     "same address as control.ops_listen"),
    (listener() + listener(name="other"), "listeners[1].listen", "same address as listeners[0].listen"),
    (listener() + listener(listen="127.0.0.1:7444"), "listeners[1].name",
     "duplicate listener name (same as listeners[0].name)"),
    (listener("colour = 1"), f"{L0}.colour", "unknown key"),
])
def test_listener_rules(tmp_path: Path, text: str, path: str, phrase: str) -> None:
    assert_problem(tmp_path, GATEWAY + target() + text, path, phrase)


def test_listeners_on_port_zero_never_clash(tmp_path: Path) -> None:
    text = GATEWAY + target() + listener(listen="127.0.0.1:0") + listener(name="b", listen="127.0.0.1:0")
    assert check(tmp_path, text).ok


def test_listener_with_several_targets_routes_by_server_name(tmp_path: Path) -> None:
    both = '["chunks", "cache"]'
    # each needs server names ...
    text = GATEWAY + target('server_names = ["chunks.gw"]') + tcp_target() + listener(targets=both)
    assert_problem(tmp_path, text, f"{L0}.targets[1]", "this listener serves several targets, so targets[1] "
                                                        "needs server_names (the client's TLS server name "
                                                        "picks the target)")
    # ... and no name may pick two of them
    text = GATEWAY + target('server_names = ["a.gw", "shared.gw"]') \
        + tcp_target('server_names = ["Shared.GW"]') + listener(targets=both)
    assert_problem(tmp_path, text, f"{L0}.targets[1]", "targets[1] shares a server name with targets[0]: "
                                                        "on one listener each name must pick one target")
    # on separate listeners, the same name is fine
    text = GATEWAY + target('server_names = ["x.gw"]') + tcp_target('server_names = ["x.gw"]') \
        + listener() + listener(name="tcp", listen="127.0.0.1:7444", targets='["cache"]')
    assert check(tmp_path, text).ok


def test_target_no_listener_serves_is_a_warning(tmp_path: Path) -> None:
    w = only_warning(tmp_path, DATA + tcp_target())
    assert w == Problem("targets[1]", "no listener serves this target: it is unreachable")
    # without any listener, every target is unreachable
    result = check(tmp_path, GATEWAY + target())
    assert result.ok
    assert result.warnings == (Problem(T0, "no listener serves this target: it is unreachable"),)


def test_one_mistake_one_problem(tmp_path: Path) -> None:
    # a malformed [[targets]] does not also make every listener reference a problem, nor a malformed
    # listener every target unreachable
    assert problems(tmp_path, "targets = 5\n" + GATEWAY + listener()) == [
        ("targets", "expected an array of tables, got an integer")]
    assert problems(tmp_path, "targets = [1]\n" + GATEWAY + listener()) == [
        (T0, "expected a table, got an integer")]
    assert problems(tmp_path, GATEWAY + target(name="Chunks") + listener()) == [
        (f"{T0}.name", "must be 1 to 32 lower-case letters, digits and '-', starting with a letter")]
    result = check(tmp_path, "listeners = [1]\n" + GATEWAY + target())
    assert [(p.path, p.message) for p in result.problems] == [(L0, "expected a table, got an integer")]
    assert result.warnings == ()
    result = check(tmp_path, GATEWAY + target() + listener(targets="5"))
    assert [p.path for p in result.problems] == [f"{L0}.targets"] and result.warnings == ()
    # an invalid scope or protocol does not also warn about them
    text = GATEWAY + target('protocol = "x"', scope='[targets.credential_scope]\naccess = ["x"]') + listener()
    result = check(tmp_path, text)
    assert [p.path for p in result.problems] == [f"{T0}.protocol", f"{T0}.credential_scope.access[0]"]
    assert result.warnings == ()


def test_data_path_secrets_are_never_echoed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = "s3cr3t-marker"
    monkeypatch.delenv(KEY_ENV)
    text = GATEWAY + target(credential=f'credential = "{marker}"') \
        + target(name="b", credential=f'credential = {{ env = "{marker.replace("-", "_")}" }}') \
        + target(name="c", credential=f'credential = {{ env = "{marker}" }}') \
        + target(name="d", credential=f'credential = {{ file = "{marker}" }}') \
        + tcp_target(f'credential = "{marker}"') + listener(targets='["chunks"]')
    result = check(tmp_path, text)
    assert len(result.problems) == 3 and len(result.warnings) >= 4
    rendered = "\n".join(str(p) for p in result.problems + result.warnings)
    assert marker not in rendered and marker.replace("-", "_") not in rendered, rendered


# --- public surface -------------------------------------------------------------------------


def test_public_surface_is_explicit() -> None:
    names = l4proxy.config.__all__
    assert len(names) == len(set(names))
    public = {n for n, v in vars(l4proxy.config).items()
              if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert public == set(names)
    assert {"Config", "GatewayConfig", "ControlConfig", "ProviderConfig", "ClaimMapping", "CaConfig",
            "JwksSourceKind", "load_config", "check_config", "ConfigError", "Problem",
            "CheckResult", "TargetProtocol", "ClientCredentials", "AccessRule", "DeclaredScope",
            "TargetConfig", "ListenerConfig", "LimitsConfig"} <= public
    assert Config.__dataclass_params__.frozen  # type: ignore[attr-defined]
