"""A Workload API client built on py-spiffe (PyPI `spiffe`), which nobody here wrote.

The end-to-end tests run it against the agent's socket and check its JSON answers:

  workload_client.py x509 OUT_DIR      fetch the X.509 context; write chain.pem, bundle.pem
  workload_client.py watch SECONDS     stream X.509 contexts until the serial changes
  workload_client.py jwt AUDIENCE      fetch a JWT-SVID, validate it through the agent and
                                       locally against the JWT bundle

The socket comes from SPIFFE_ENDPOINT_SOCKET, as for any SPIFFE workload.
"""

import json
import sys
import threading
import time

from cryptography.hazmat.primitives import serialization
from spiffe import JwtSvid, WorkloadApiClient


def pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def public_der(key):
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def x509(out_dir):
    with WorkloadApiClient(default_timeout=20) as client:
        context = client.fetch_x509_context()
    svid = context.default_svid
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(
        svid.spiffe_id.trust_domain
    )
    with open(f"{out_dir}/chain.pem", "w") as f:
        f.write("".join(pem(c) for c in svid.cert_chain))
    with open(f"{out_dir}/leaf.pem", "w") as f:
        f.write(pem(svid.leaf))
    with open(f"{out_dir}/intermediates.pem", "w") as f:
        f.write("".join(pem(c) for c in svid.cert_chain[1:]))
    with open(f"{out_dir}/bundle.pem", "w") as f:
        f.write("".join(pem(c) for c in bundle.x509_authorities))
    print(json.dumps({
        "spiffe_id": str(svid.spiffe_id),
        "serial": format(svid.leaf.serial_number, "x"),
        "key_matches_leaf": public_der(svid.private_key.public_key())
        == public_der(svid.leaf.public_key()),
        "chain_length": len(svid.cert_chain),
        "bundle_size": len(bundle.x509_authorities),
    }))


def watch(seconds):
    serials = []
    errors = []
    done = threading.Event()

    def on_success(context):
        serial = format(context.default_svid.leaf.serial_number, "x")
        if not serials or serials[-1] != serial:
            serials.append(serial)
        if len(serials) >= 2:
            done.set()

    def on_error(error):
        errors.append(str(error))

    with WorkloadApiClient() as client:
        handler = client.stream_x509_contexts(on_success, on_error)
        done.wait(float(seconds))
        handler.cancel()
    print(json.dumps({"serials": serials, "errors": errors}))


def jwt(audience):
    with WorkloadApiClient(default_timeout=20) as client:
        svid = client.fetch_jwt_svid(audience={audience})
        validated = client.validate_jwt_svid(svid.token, audience)
        bundles = client.fetch_jwt_bundles()
    bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    local = JwtSvid.parse_and_validate(svid.token, bundle, {audience})
    print(json.dumps({
        "spiffe_id": str(svid.spiffe_id),
        "validated_by_agent": str(validated.spiffe_id),
        "validated_locally": str(local.spiffe_id),
        "expiry": svid.expiry,
        "now": int(time.time()),
    }))


if __name__ == "__main__":
    command, argument = sys.argv[1], sys.argv[2]
    {"x509": x509, "watch": watch, "jwt": jwt}[command](argument)
