#!/usr/bin/env python3
"""A TLS-terminating reverse proxy (nginx) in front of a search server, for tests and demos.

    python scripts/tls_proxy.py --upstream http://127.0.0.1:39200 --dir /tmp/proxy \
        [--user hindsight --password secret] [--client-certs]

Generates a throwaway CA, a server certificate for 127.0.0.1/localhost and a client
certificate (openssl CLI), an htpasswd file (openssl passwd -apr1), and runs Debian's nginx
on a free loopback port with TLS, optional basic auth and optional client-certificate
checks, proxying to the upstream. Prints the URL and the CA path; runs until interrupted.
Standard library only; the tests import it (tests/test_tls_auth.py).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

NGINX_CANDIDATES = ("nginx", "/usr/sbin/nginx")


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def nginx_binary() -> str | None:
    for candidate in NGINX_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")


def make_pki(directory: Path) -> Pki:
    """A CA and two leaf certificates signed by it (EC P-256 keys: quick to make)."""
    directory.mkdir(parents=True, exist_ok=True)
    key_opts = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *key_opts, "-keyout", "ca.key", "-out", "ca.pem", "-days", "3",
             "-subj", "/CN=hindsight-py test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    leaves = {
        "server": ("/CN=localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
        "client": ("/CN=hindsight-py client", "extendedKeyUsage=clientAuth\n"),
    }
    for name, (subject, extensions) in leaves.items():
        (directory / f"{name}.ext").write_text(extensions)
        _openssl("req", *key_opts, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=directory)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "3", "-extfile", f"{name}.ext", cwd=directory)
    return Pki(*(directory / f for f in ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem",
                                           "client.key")))


def write_htpasswd(path: Path, user: str, password: str) -> Path:
    hashed = subprocess.run(["openssl", "passwd", "-apr1", password], capture_output=True, text=True, check=True)
    path.write_text(f"{user}:{hashed.stdout.strip()}\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TlsProxy:
    """nginx on 127.0.0.1:<free port>, TLS with `pki`'s server certificate, proxying to `upstream`."""

    def __init__(self, directory: Path, upstream: str, pki: Pki, *, htpasswd: Path | None = None,
                 require_client_cert: bool = False) -> None:
        self.directory = directory
        self.upstream = upstream.rstrip("/")
        self.pki = pki
        self.htpasswd = htpasswd
        self.require_client_cert = require_client_cert
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.directory / "access.log"

    def statuses(self) -> list[int]:
        """The HTTP status of every request so far, in order (from the access log)."""
        if not self.access_log.exists():
            return []
        return [int(line.split('" ', 1)[1].split()[0]) for line in self.access_log.read_text().splitlines()
                if '" ' in line]

    def _config(self) -> str:
        d = self.directory
        auth = f'auth_basic "search"; auth_basic_user_file {self.htpasswd};' if self.htpasswd else ""
        client = (f"ssl_client_certificate {self.pki.ca_cert}; ssl_verify_client on;"
                  if self.require_client_cert else "")
        temp = " ".join(f"{kind}_temp_path {d}/tmp/{kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                           "uwsgi", "scgi"))
        # master_process off: one process that runs as the caller, so it can read files in private
        # temporary directories (nginx workers started by root would run as nobody)
        return f"""
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {d}/access.log;
    {temp}
    client_max_body_size 512m;
    server {{
        listen 127.0.0.1:{self.port} ssl;
        ssl_certificate {self.pki.server_cert};
        ssl_certificate_key {self.pki.server_key};
        {client}
        location / {{
            {auth}
            proxy_pass {self.upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
        }}
    }}
}}
"""

    def start(self, timeout: float = 15.0) -> str:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (Debian: apt-get install nginx-light)")
        (self.directory / "tmp").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = self.directory / "nginx.conf"
        conf.write_text(self._config())
        log = open(self.directory / "nginx.out", "wb")
        self.process = subprocess.Popen(
            [binary, "-p", str(self.directory), "-e", str(self.directory / "error.log"), "-c", str(conf)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}: "
                                   + (self.directory / "nginx.out").read_text(errors="replace")[-2000:]
                                   + (self.directory / "error.log").read_text(errors="replace")[-2000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self.url
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not listen on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finish the requests in flight
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", default="http://127.0.0.1:39200")
    ap.add_argument("--dir", type=Path, required=True, help="where the certificates, config and logs go")
    ap.add_argument("--user")
    ap.add_argument("--password")
    ap.add_argument("--client-certs", action="store_true", help="require a client certificate signed by the CA")
    args = ap.parse_args()
    pki = make_pki(args.dir / "pki")
    htpasswd = write_htpasswd(args.dir / "htpasswd", args.user, args.password or "") if args.user else None
    proxy = TlsProxy(args.dir, args.upstream, pki, htpasswd=htpasswd, require_client_cert=args.client_certs)
    print(proxy.start())
    print(f"CA bundle: {pki.ca_cert}; client certificate: {pki.client_cert} (key {pki.client_key})", flush=True)
    try:
        while proxy.process is not None and proxy.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
