"""Reading manifests: their media type and what they refer to."""

from __future__ import annotations

import json
from typing import Any

from ociregistry.errors import InvalidDigest, InvalidManifest
from ociregistry.grammar import check_digest
from ociregistry.index import Reference

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
IMAGE_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
KNOWN_TYPES = INDEX_TYPES + IMAGE_TYPES + DOCKER_SCHEMA1
# Content types that say nothing, so the document's own mediaType decides.
_VAGUE_TYPES = ("", "application/json", "application/octet-stream", "text/plain")


def _invalid(source: str, why: str) -> InvalidManifest:
    return InvalidManifest(f"{source} sent an invalid manifest: {why}")


def describe(content: bytes, content_type: str | None, source: str) -> tuple[str, list[Reference]]:
    """The media type of a fetched manifest and its references.

    Raises MANIFEST_INVALID (naming ``source``) for anything that is not a
    manifest: not JSON, truncated, the wrong content type.
    """
    try:
        document = json.loads(content)
    except (ValueError, UnicodeDecodeError) as e:
        raise _invalid(source, f"not JSON ({e})") from None
    if not isinstance(document, dict):
        raise _invalid(source, "not a JSON object")
    declared = (content_type or "").split(";")[0].strip().lower()
    media_type = declared if declared in KNOWN_TYPES else None
    if media_type is None:
        if declared not in _VAGUE_TYPES:
            raise _invalid(source, f"unexpected content type {declared!r}")
        media_type = _guess(document)
    if media_type is None:
        raise _invalid(source, "unknown manifest media type")
    try:
        return media_type, _references(document, media_type)
    except (KeyError, TypeError, ValueError) as e:
        raise _invalid(source, f"malformed descriptor ({e!r})") from None


def _guess(document: dict[str, Any]) -> str | None:
    inner = document.get("mediaType")
    if isinstance(inner, str) and inner in KNOWN_TYPES:
        return inner
    if inner is None and document.get("schemaVersion") == 2:
        if "manifests" in document:
            return OCI_INDEX
        if "layers" in document:
            return OCI_MANIFEST
    return None


def _references(document: dict[str, Any], media_type: str) -> list[Reference]:
    if media_type in INDEX_TYPES:
        return [_reference(m, "manifest") for m in document["manifests"]]
    if media_type in IMAGE_TYPES:
        return [_reference(document["config"], "config")] + [
            _reference(layer, "layer") for layer in document["layers"]
        ]
    return []


def _reference(descriptor: dict[str, Any], kind: str) -> Reference:
    digest = descriptor["digest"]
    if not isinstance(digest, str):
        raise TypeError("digest is not a string")
    try:
        # These digests become file names: only well-formed ones are accepted.
        check_digest(digest)
    except InvalidDigest as e:
        raise ValueError(e.message) from None
    platform = _platform(descriptor.get("platform")) if kind == "manifest" else None
    return Reference(digest, kind, str(descriptor["mediaType"]), int(descriptor["size"]), platform)


def _platform(platform: Any) -> str | None:
    if not isinstance(platform, dict):
        return None
    parts = [platform.get("os"), platform.get("architecture"), platform.get("variant")]
    return "/".join(str(p) for p in parts if p) or None
