"""Identity: the identity model, OIDC ID-token verification, JWKS caching, the internal CA
and certificate minting. The pure parts take the time as an argument."""

from ._model import PROVIDER_NAME, Identity, VerifiedToken, identity_uri, parse_identity_uri

__all__ = ["PROVIDER_NAME", "Identity", "VerifiedToken", "identity_uri", "parse_identity_uri"]
