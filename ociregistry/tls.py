"""TLS towards our own clients, with certificates re-read on SIGHUP."""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate
from twisted.logger import Logger
from zope.interface import implementer

from ociregistry.config import ServerTLSSettings

log = Logger()


@implementer(IOpenSSLContextFactory)
class ServerTLS:
    """An OpenSSL context factory whose context can be replaced while serving.

    Each new connection asks for the current context, so a reload affects
    new connections only; connections already open keep theirs.
    """

    def __init__(self, settings: ServerTLSSettings) -> None:
        self._settings = settings
        self._context = self._load()

    def _load(self) -> SSL.Context:
        settings = self._settings
        with open(settings.cert, "rb") as cert, open(settings.key, "rb") as key:
            pair = PrivateCertificate.loadPEM(cert.read() + b"\n" + key.read())
        authorities = []
        if settings.ca:
            with open(settings.ca, "rb") as ca:
                authorities = [Certificate.loadPEM(ca.read()).original]
        verify = settings.client_auth == "verify"
        options = CertificateOptions(
            privateKey=pair.privateKey.original,
            certificate=pair.original,
            verify=verify,
            caCerts=authorities if verify else None,
            requireCertificate=verify,
        )
        return options.getContext()

    def getContext(self) -> SSL.Context:
        """The context for a new connection."""
        return self._context

    def reload(self) -> None:
        """Re-read the certificate, key and CA; keep the old ones if that fails."""
        try:
            self._context = self._load()
        except Exception as e:
            log.error("Could not reload TLS certificates, keeping the current ones: {why}", why=e)
            return
        log.info("Reloaded TLS certificates from {cert}", cert=self._settings.cert)
