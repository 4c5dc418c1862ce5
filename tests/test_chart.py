"""The Helm chart, proven without a cluster: helm lints and renders it, kubernetes-validate
checks every rendered object strictly against Kubernetes 1.30 and the newest schemas it
bundles, and the rendered objects follow the values."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile
from typing import Any

import yaml
from twisted.trial.unittest import SynchronousTestCase

from ociregistry.config import ConfigError, load_config_file
from ociregistry.tap import Options
from tests.realparts import PROJECT_ROOT, installed_script

CHART = os.path.join(PROJECT_ROOT, "deploy", "helm", "ociregistry")
EXAMPLES = sorted(glob.glob(os.path.join(CHART, "examples", "*.yaml")))
# Installed by scripts/test (scripts/helm); tests never fetch it themselves.
HELM = os.path.join(PROJECT_ROOT, ".tools", "helm")
# The oldest version the chart is checked for, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", None)
# Kinds of custom resources, whose schemas kubernetes-validate does not have.
CUSTOM_KINDS = {"ServiceMonitor"}
REPLICAS_EXAMPLE = os.path.join(CHART, "examples", "replicas.yaml")
# What the replicas example's Secrets would hold, and a pod's address.
SECRETS = {"OCIREGISTRY_S3_SECRET": "s3-secret",
           "OCIREGISTRY_INDEX_URL": "postgresql://ociregistry:pw@db.internal:5432/ociregistry"}
POD_IP = "10.1.2.3"
# The shared store given with --set: the database URL without a password, in the config file.
SHARED_STORE = ["--set", "replicas=3",
                "--set", "sharedStore.postgresql.url=postgresql://ociregistry@db.internal:5432/ociregistry",
                "--set", "sharedStore.s3.endpoint=http://rgw.internal:7480",
                "--set", "sharedStore.s3.bucket=ociregistry", "--set", "sharedStore.s3.accessKey=OCIREG",
                "--set", "sharedStore.s3.secretKeySecret.name=ociregistry-s3"]


def helm(home: str, *args: str) -> subprocess.CompletedProcess[str]:
    """helm with its cache, configuration and data under `home`."""
    if not os.access(HELM, os.X_OK):
        raise RuntimeError(f"{HELM} is missing: scripts/test installs it (scripts/helm)")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home,
           "HELM_CACHE_HOME": os.path.join(home, "cache"),
           "HELM_CONFIG_HOME": os.path.join(home, "config"),
           "HELM_DATA_HOME": os.path.join(home, "data")}
    return subprocess.run([HELM, *args], env=env, text=True, capture_output=True, timeout=60)


def render_chart(home: str, *args: str) -> list[dict[str, Any]]:
    """The objects `helm template` renders from the chart with these arguments."""
    result = helm(home, "template", "cache", CHART, "--namespace", "mirror", *args)
    if result.returncode != 0:
        raise RuntimeError(f"helm template {' '.join(args)}: {result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


class ChartTestCase(SynchronousTestCase):
    """Runs helm with a private home, and reads what it renders."""

    def setUp(self) -> None:
        self.home = tempfile.mkdtemp(prefix="helm-home-")
        self.addCleanup(shutil.rmtree, self.home, ignore_errors=True)

    def helm(self, *args: str) -> subprocess.CompletedProcess[str]:
        """helm with a private home."""
        return helm(self.home, *args)

    def render(self, *args: str) -> list[dict[str, Any]]:
        """The rendered objects."""
        return render_chart(self.home, *args)

    def values_file(self, values: dict[str, Any]) -> str:
        """A values file holding `values`."""
        path = os.path.join(self.home, f"values-{len(os.listdir(self.home))}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(values, f)
        return path

    def one(self, objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
        """The single object of a kind."""
        found = [o for o in objects if o["kind"] == kind]
        self.assertEqual(len(found), 1, [o["kind"] for o in objects])
        return found[0]

    def server_config(self, objects: list[dict[str, Any]]) -> dict[str, Any]:
        """The server's configuration file, as the ConfigMap holds it."""
        return dict(yaml.safe_load(self.one(objects, "ConfigMap")["data"]["config.yaml"]))

    def container(self, objects: list[dict[str, Any]]) -> dict[str, Any]:
        """The server's container in the Deployment."""
        containers = self.one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
        self.assertEqual(len(containers), 1)
        return dict(containers[0])


class LintAndValidateTests(ChartTestCase):
    """The chart is clean with its defaults and with each documented example."""

    def test_examples_exist(self) -> None:
        """The documented example values files are there (the checks below go through each)."""
        self.assertEqual([os.path.basename(p) for p in EXAMPLES],
                         ["monitoring.yaml", "nodeport.yaml", "replicas.yaml", "secrets.yaml",
                          "throwaway.yaml", "tls.yaml"])

    def test_lint(self) -> None:
        """helm lint --strict passes with the defaults and with each example."""
        for values in [[], *(["--values", path] for path in EXAMPLES)]:
            result = self.helm("lint", "--strict", CHART, *values)
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_rendered_objects_validate(self) -> None:
        """Every rendered object passes kubernetes-validate --strict, with no warning, for
        Kubernetes 1.30 and the newest version it knows, with the defaults and each example."""
        validate = installed_script("kubernetes-validate")
        for values in [[], *(["--values", path] for path in EXAMPLES)]:
            objects = [o for o in self.render(*values) if o["kind"] not in CUSTOM_KINDS]
            path = self.values_file({})  # a fresh name
            with open(path, "w") as f:
                yaml.safe_dump_all(objects, f)
            for version in KUBERNETES_VERSIONS:
                flags = ["--strict"] + (["--kubernetes-version", version] if version else [])
                result = subprocess.run([validate, *flags, path], text=True, capture_output=True,
                                        timeout=120)
                report = result.stdout + result.stderr
                self.assertEqual(result.returncode, 0, f"{values}: {report}")
                lines = report.splitlines()
                self.assertEqual([line for line in lines if not line.startswith("INFO ")], [],
                                 f"{values} {version}")
                self.assertEqual(len([line for line in lines if " passed for resource " in line]),
                                 len(objects), report)


class ValuesTests(ChartTestCase):
    """A changed value shows in the rendered manifests."""

    def test_defaults(self) -> None:
        """By default: one server in a Deployment that recreates it, its cache on a claim,
        non-root with a read-only root and no capabilities, probes on /health, a ClusterIP."""
        objects = self.render()
        deployment = self.one(objects, "Deployment")
        self.assertEqual(deployment["spec"]["replicas"], 1)
        self.assertEqual(deployment["spec"]["strategy"], {"type": "Recreate"})
        pod = deployment["spec"]["template"]["spec"]
        self.assertEqual((pod["securityContext"]["runAsNonRoot"], pod["securityContext"]["runAsUser"]),
                         (True, 10001))
        container = self.container(objects)
        self.assertEqual(container["args"], ["--config-file", "/etc/ociregistry/config.yaml"])
        self.assertEqual(container["securityContext"],
                         {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                          "capabilities": {"drop": ["ALL"]}})
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            self.assertEqual(container[probe]["httpGet"],
                             {"path": "/health", "port": "http", "scheme": "HTTP"})
        claim = self.one(objects, "PersistentVolumeClaim")
        self.assertEqual(claim["spec"]["resources"]["requests"]["storage"], "20Gi")
        volumes = {v["name"]: v for v in pod["volumes"]}
        self.assertEqual(volumes["cache"]["persistentVolumeClaim"]["claimName"],
                         claim["metadata"]["name"])
        self.assertEqual(self.one(objects, "Service")["spec"]["type"], "ClusterIP")
        self.assertEqual([o["kind"] for o in objects if o["kind"] in CUSTOM_KINDS], [])

    def test_persistence_off(self) -> None:
        """Persistence off: no claim, the cache in an emptyDir."""
        objects = self.render("--set", "persistence.enabled=false",
                              "--set", "persistence.emptyDirSizeLimit=5Gi")
        self.assertEqual([o for o in objects if o["kind"] == "PersistentVolumeClaim"], [])
        pod = self.one(objects, "Deployment")["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        self.assertEqual(volumes["cache"], {"name": "cache", "emptyDir": {"sizeLimit": "5Gi"}})

    def test_storage_class_and_size(self) -> None:
        """The claim takes its size and storage class from the values."""
        claim = self.one(self.render("--set", "persistence.size=80Gi",
                                     "--set", "persistence.storageClass=fast"),
                         "PersistentVolumeClaim")
        self.assertEqual((claim["spec"]["resources"]["requests"]["storage"],
                          claim["spec"]["storageClassName"]), ("80Gi", "fast"))

    def test_node_port(self) -> None:
        """service.type NodePort with a nodePort: the Service listens on that port of every node."""
        service = self.one(self.render("--set", "service.type=NodePort",
                                       "--set", "service.nodePort=30500"), "Service")
        self.assertEqual(service["spec"]["type"], "NodePort")
        self.assertEqual([(p["name"], p["nodePort"], p["targetPort"]) for p in service["spec"]["ports"]],
                         [("http", 30500, "http")])

    def test_secrets_referenced(self) -> None:
        """Credentials, the admin token and a registry password come from the named Secrets."""
        objects = self.render("--values", os.path.join(CHART, "examples", "secrets.yaml"))
        container = self.container(objects)
        env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
        self.assertEqual(env, {
            "OCIREGISTRY_CREDENTIALS": {"name": "ociregistry-credentials", "key": "credentials"},
            "PRIVATE_REGISTRY_PASSWORD": {"name": "private-registry", "key": "password"}})
        self.assertEqual(container["args"][2:], ["--admin-token-file", "/etc/ociregistry/admin/token"])
        pod = self.one(objects, "Deployment")["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        self.assertEqual(volumes["admin-token"]["secret"],
                         {"secretName": "ociregistry-admin", "items": [{"key": "token", "path": "token"}]})
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        self.assertEqual(mounts["admin-token"], "/etc/ociregistry/admin")
        registries = self.server_config(objects)["registries"]
        self.assertEqual(registries[0]["auth"]["passwordFromEnv"], "PRIVATE_REGISTRY_PASSWORD")
        self.assertNotIn("Secret", [o["kind"] for o in objects])

    def test_tls_from_secret(self) -> None:
        """TLS: the Secret is mounted, the config names its files, probes use the plain
        /health port that clientAuth verify needs."""
        objects = self.render("--values", os.path.join(CHART, "examples", "tls.yaml"))
        tls = self.server_config(objects)["serverTlsConfig"]
        self.assertEqual(tls, {"cert": "/etc/ociregistry/tls/tls.crt",
                               "key": "/etc/ociregistry/tls/tls.key",
                               "ca": "/etc/ociregistry/tls/ca.crt", "clientAuth": "verify"})
        container = self.container(objects)
        self.assertEqual({m["name"]: m["mountPath"] for m in container["volumeMounts"]}["tls"],
                         "/etc/ociregistry/tls")
        pod = self.one(objects, "Deployment")["spec"]["template"]["spec"]
        self.assertEqual({v["name"]: v for v in pod["volumes"]}["tls"]["secret"],
                         {"secretName": "ociregistry-tls"})
        self.assertEqual(container["livenessProbe"]["httpGet"],
                         {"path": "/health", "port": "health", "scheme": "HTTP"})
        self.assertIn({"name": "health", "containerPort": 8082, "protocol": "TCP"}, container["ports"])
        plain = self.container(self.render("--set", "tls.enabled=true", "--set", "tls.secretName=t"))
        self.assertEqual(plain["readinessProbe"]["httpGet"],
                         {"path": "/health", "port": "http", "scheme": "HTTPS"})

    def test_service_monitor(self) -> None:
        """The ServiceMonitor toggle scrapes /metrics on the port config.metrics opens."""
        objects = self.render("--values", os.path.join(CHART, "examples", "monitoring.yaml"))
        monitor = self.one(objects, "ServiceMonitor")
        self.assertEqual(monitor["apiVersion"], "monitoring.coreos.com/v1")
        self.assertEqual(monitor["metadata"]["labels"]["release"], "prometheus")
        self.assertEqual([(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]],
                         [("metrics", "/metrics")])
        self.assertEqual(monitor["spec"]["selector"]["matchLabels"],
                         self.one(objects, "Service")["spec"]["selector"])
        ports = self.one(objects, "Service")["spec"]["ports"]
        self.assertIn({"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}, ports)

    def test_every_config_key_reachable(self) -> None:
        """ociregistry/example-config.yaml given as `config` is the server's config file as it is."""
        with open(os.path.join(PROJECT_ROOT, "ociregistry", "example-config.yaml")) as f:
            example = yaml.safe_load(f)
        objects = self.render("--values", self.values_file({"config": example}))
        self.assertEqual(self.server_config(objects), example)

    def config_file(self, objects: list[dict[str, Any]]) -> str:
        """The rendered configuration file, written where the server can read it."""
        path = self.values_file({})
        with open(path, "w") as f:
            yaml.safe_dump(self.server_config(objects), f)
        return path

    def test_rendered_config_loads(self) -> None:
        """The server reads the rendered configuration of the defaults and of the examples
        that name no files, the shared store's (storage.s3) among them."""
        failed: dict[str, str] = {}
        for values in [[], *(["--values", path] for path in EXAMPLES if "tls" not in path)]:
            path = self.config_file(self.render(*values))
            try:
                settings = load_config_file(path, {"PRIVATE_REGISTRY_PASSWORD": "secret", **SECRETS})
            except ConfigError as e:
                failed[os.path.basename(values[-1]) if values else "defaults"] = str(e)
                continue
            self.assertEqual((settings.image_path, settings.port), ("/var/lib/ociregistry", 8080))
        self.assertEqual(list(failed), [], "\n".join(failed.values()))
        settings = load_config_file(self.config_file(self.render(*SHARED_STORE)), SECRETS)
        self.assertEqual(settings.index_url, "postgresql://ociregistry@db.internal:5432/ociregistry")

    def test_shared_store_arguments_parse(self) -> None:
        """The server takes the replicas' arguments, as Kubernetes expands them from the pod's
        environment: the database URL from its Secret, the advertised URL from the pod's IP."""
        objects = self.render("--values", REPLICAS_EXAMPLE)
        container = self.container(objects)
        environment = {**SECRETS, "POD_IP": POD_IP}
        self.assertEqual(sorted(e["name"] for e in container["env"]), sorted(environment))
        args = [re.sub(r"\$\((\w+)\)", lambda m: environment[m.group(1)], arg) for arg in container["args"]]
        self.assertEqual(args[:2], ["--config-file", "/etc/ociregistry/config.yaml"])
        for name, value in SECRETS.items():
            os.environ[name] = value
            self.addCleanup(os.environ.pop, name)
        options = Options()
        options.parseOptions(["--config-file", self.config_file(objects), *args[2:]])
        self.assertEqual(options.config.index_url, SECRETS["OCIREGISTRY_INDEX_URL"])
        self.assertEqual(options["advertise-url"], f"http://{POD_IP}:8080")

    def test_config_change_restarts_the_pod(self) -> None:
        """A changed configuration changes the pod template (its checksum annotation)."""
        def checksum(*args: str) -> str:
            pod = self.one(self.render(*args), "Deployment")["spec"]["template"]
            return str(pod["metadata"]["annotations"]["checksum/config"])
        self.assertNotEqual(checksum(), checksum("--set", "config.logLevel=debug"))

    def test_shared_store(self) -> None:
        """replicas 3: a Deployment of 3 replaced while the others serve, a PodDisruptionBudget,
        no claim, the shared index and bucket in the config file, the S3 secret key from its
        Secret, each pod advertising its own address, replicas preferably on different nodes."""
        objects = self.render(*SHARED_STORE, "--set", "sharedStore.spoolSizeLimit=8Gi")
        deployment = self.one(objects, "Deployment")
        self.assertEqual(deployment["spec"]["replicas"], 3)
        self.assertEqual(deployment["spec"]["strategy"],
                         {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
        budget = self.one(objects, "PodDisruptionBudget")
        self.assertEqual(budget["spec"], {"maxUnavailable": 1,
                                          "selector": deployment["spec"]["selector"]})
        self.assertEqual([o for o in objects if o["kind"] == "PersistentVolumeClaim"], [])
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        self.assertEqual(volumes["cache"], {"name": "cache", "emptyDir": {"sizeLimit": "8Gi"}})
        config = self.server_config(objects)
        self.assertEqual(config["index"], {"postgresql": "postgresql://ociregistry@db.internal:5432/ociregistry"})
        self.assertEqual(config["storage"], {"s3": {
            "endpoint": "http://rgw.internal:7480", "bucket": "ociregistry", "region": "us-east-1",
            "accessKey": "OCIREG", "secretKeyFromEnv": "OCIREGISTRY_S3_SECRET", "prefix": "",
            "redirect": False}})
        container = self.container(objects)
        self.assertEqual(container["env"], [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "OCIREGISTRY_S3_SECRET",
             "valueFrom": {"secretKeyRef": {"name": "ociregistry-s3", "key": "secretKey"}}}])
        self.assertEqual(container["args"], ["--config-file", "/etc/ociregistry/config.yaml",
                                             "--advertise-url", "http://$(POD_IP):8080"])
        self.assertEqual(pod["affinity"], {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                "labelSelector": deployment["spec"]["selector"]}}]}})

    def test_shared_store_database_url_from_secret(self) -> None:
        """The replicas example: the database URL, password included, from a Secret given with
        --index-url, and none in the config file; a NodePort in front of the replicas."""
        objects = self.render("--values", REPLICAS_EXAMPLE)
        self.assertEqual(self.one(objects, "Deployment")["spec"]["replicas"], 3)
        container = self.container(objects)
        self.assertEqual(container["args"][2:], ["--advertise-url", "http://$(POD_IP):8080",
                                                 "--index-url", "$(OCIREGISTRY_INDEX_URL)"])
        env = {e["name"]: e["valueFrom"] for e in container["env"]}
        self.assertEqual(env["OCIREGISTRY_INDEX_URL"],
                         {"secretKeyRef": {"name": "ociregistry-index", "key": "url"}})
        self.assertNotIn("index", self.server_config(objects))
        self.assertEqual(self.one(objects, "Service")["spec"]["ports"][0]["nodePort"], 30500)

    def test_shared_store_choices(self) -> None:
        """One replica on the shared store with sharedStore.enabled; minAvailable replaces
        maxUnavailable; affinity of one's own keeps the spreading across nodes; with TLS
        the replicas advertise https."""
        objects = self.render(*SHARED_STORE, "--set", "replicas=1", "--set", "sharedStore.enabled=true",
                              "--set", "podDisruptionBudget.minAvailable=50%",
                              "--set", "affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0]"
                                       ".weight=1",
                              "--set", "tls.enabled=true", "--set", "tls.secretName=t")
        deployment = self.one(objects, "Deployment")
        self.assertEqual((deployment["spec"]["replicas"], deployment["spec"]["strategy"]["type"]),
                         (1, "RollingUpdate"))
        self.assertEqual(self.one(objects, "PodDisruptionBudget")["spec"]["minAvailable"], "50%")
        affinity = deployment["spec"]["template"]["spec"]["affinity"]
        self.assertEqual(sorted(affinity), ["nodeAffinity", "podAntiAffinity"])
        self.assertEqual(self.container(objects)["args"][2:], ["--advertise-url", "https://$(POD_IP):8080"])

    def test_refused_values(self) -> None:
        """Values that cannot work stop the rendering with a message saying why."""
        def without(key: str) -> list[str]:
            return ["--values", REPLICAS_EXAMPLE, "--set", f"{key}="]
        for args, message in [
            (["--set", "replicas=3"], "replicas > 1 needs the shared index: set "
                                      "sharedStore.postgresql.urlSecret.name"),
            (["--set", "sharedStore.enabled=true"], "sharedStore.enabled needs the shared index"),
            (without("sharedStore.postgresql.urlSecret.name"), "replicas > 1 needs the shared index"),
            ([*SHARED_STORE, "--set", "sharedStore.postgresql.urlSecret.name=db"],
             "sharedStore.postgresql.url and sharedStore.postgresql.urlSecret.name both name the database"),
            (without("sharedStore.s3.endpoint"), "replicas > 1 needs sharedStore.s3.endpoint: "
                                                 "the S3-compatible store's URL"),
            (without("sharedStore.s3.bucket"), "replicas > 1 needs sharedStore.s3.bucket"),
            (without("sharedStore.s3.region"), "replicas > 1 needs sharedStore.s3.region"),
            (without("sharedStore.s3.accessKey"), "replicas > 1 needs sharedStore.s3.accessKey"),
            (without("sharedStore.s3.secretKeySecret.name"),
             "replicas > 1 needs sharedStore.s3.secretKeySecret.name: a Secret whose key \"secretKey\""),
            (["--values", REPLICAS_EXAMPLE, "--set", "podDisruptionBudget.maxUnavailable=null"],
             "podDisruptionBudget needs maxUnavailable or minAvailable"),
            (["--set", "tls.enabled=true"], "tls.enabled needs tls.secretName"),
            (["--set", "tls.enabled=true", "--set", "tls.secretName=t", "--set", "tls.clientAuth=verify"],
             "set config.health"),
            (["--set", "service.type=LoadBalancer"], "service.type is ClusterIP or NodePort"),
        ]:
            result = self.helm("template", "cache", CHART, *args)
            self.assertNotEqual(result.returncode, 0, args)
            self.assertIn(message, result.stderr)
