from twisted.application.service import ServiceMaker

ociregistry = ServiceMaker(
    "ociregistry",
    "ociregistry.tap",
    "A pull-only, pull-through, caching OCI Distribution server.",
    "ociregistry",
)
