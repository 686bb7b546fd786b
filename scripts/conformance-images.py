#!/usr/bin/env python3
"""Builds the container images the [Conformance] e2e specs run, as OCI image layouts, with no
registry and no Docker: Debian's binaries (and the libraries `ldd` names) on a busybox
userland, plus the test binaries built from the source tree (agnhost, sample-apiserver, nnp).

    conformance-images.py SRC OUT

Names and tags come from SRC/test/utils/image/manifest.go, so they are what this e2e.test asks
for. Writes OUT/images/<dir>/ (one OCI layout per repository) and OUT/images/images.tsv:
`dir<TAB>repository<TAB>tags<TAB>real|stand-in<TAB>note`, which `conformance.sh run` imports
with `orq image import`. Root only (ownership, setuid bits); installs the Debian packages it
copies from when missing.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = ["umoci", "busybox-static", "bind9-dnsutils", "netcat-openbsd", "curl", "bash",
            "libc-bin", "etcd-server", "gcc", "libc6-dev"]
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def sh(*args, **kw):
    return subprocess.run([str(a) for a in args], check=True, **kw)


def out(*args):
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True).stdout


def ensure_packages():
    missing = [p for p in PACKAGES
               if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if missing:
        sh("apt-get", "update", "-qq")
        sh("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing,
           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


class Manifest:
    """The image names e2e.test uses: `name(ID)` -> (repository, tag)."""

    def __init__(self, src: Path):
        text = (src / "test/utils/image/manifest.go").read_text()
        block = text.split("initRegistry = RegistryList{", 1)[1].split("\n\t}", 1)[0]
        self.registries = dict(re.findall(r'(\w+):\s*"([^"]+)"', block))
        self.configs = {m[0]: (m[1], m[2], m[3]) for m in re.findall(
            r'configs\[(\w+)\] = Config\{list\.(\w+), "([^"]+)", "([^"]+)"\}', text)}

    def name(self, image_id: str) -> tuple[str, str]:
        registry, name, tag = self.configs[image_id]
        return f"{self.registries[registry]}/{name}", tag


class Rootfs:
    """A busybox userland to which binaries are added with their shared libraries."""

    def __init__(self, work: Path, name: str, busybox: bool = True):
        self.root = work / name
        self.root.mkdir(parents=True)
        if busybox:
            self.busybox()

    def busybox(self):
        r = self.root
        for d in ["bin", "sbin", "usr/bin", "usr/sbin", "usr/local/bin", "etc", "tmp", "root",
                  "home", "var/tmp", "var/log", "run", "proc", "sys", "dev"]:
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "tmp", 0o1777)
        os.chmod(r / "var/tmp", 0o1777)
        os.chmod(r / "root", 0o700)
        shutil.copy2("/bin/busybox", r / "bin/busybox")
        for applet in out("/bin/busybox", "--list").split():
            if applet != "busybox" and not (r / "bin" / applet).exists():
                (r / "bin" / applet).symlink_to("busybox")
        (r / "etc/passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
            "www-data:x:33:33:www-data:/var/www:/bin/false\nnginx:x:101:101:nginx:/nonexistent:/bin/false\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
        (r / "etc/group").write_text(
            "root:x:0:\ndaemon:x:1:\nwww-data:x:33:\nnginx:x:101:\nnogroup:x:65534:\nnobody:x:65534:\n")
        (r / "etc/nsswitch.conf").write_text("hosts: files dns\npasswd: files\ngroup: files\n")
        (r / "etc/hosts").write_text("")
        (r / "etc/resolv.conf").write_text("")

    def add(self, src: str, dest: str | None = None, mode: int = 0o755):
        """Copies `src` to `dest` (default: the same path) and every library it links."""
        target = self.root / (dest or src).lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(src), target)
        os.chmod(target, mode)
        linked = subprocess.run(["ldd", src], capture_output=True, text=True)
        if linked.returncode != 0:
            return  # static
        if "not found" in linked.stdout:
            sys.exit(f"{src}: unresolved libraries:\n{linked.stdout}")
        for lib in re.findall(r"(?:=> )?(/\S+) \(0x", linked.stdout):
            copy = self.root / lib.lstrip("/")
            if not copy.exists():
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(os.path.realpath(lib), copy)

    def write(self, path: str, text: str, mode: int = 0o644):
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        os.chmod(target, mode)


class Images:
    def __init__(self, out_dir: Path):
        self.dir = out_dir / "images"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.rows = []

    def register(self, repo_tag: tuple[str, str], rootfs: Rootfs, kind: str, note: str,
                 config: list[str], extra_tags: tuple[str, ...] = ()):
        """One OCI layout with one layer holding `rootfs`, tagged `tag` and `extra_tags`."""
        repo, tag = repo_tag
        name = repo.split("/", 1)[1].replace("/", "_")
        layout = self.dir / name
        if not layout.exists():
            sh("umoci", "init", "--layout", layout)
        image = f"{layout}:{tag}"
        sh("umoci", "new", "--image", image)
        with tempfile.TemporaryDirectory(dir=self.dir) as tmp:
            bundle = Path(tmp) / "bundle"
            sh("umoci", "unpack", "--image", image, bundle, stdout=subprocess.DEVNULL)
            sh("cp", "-a", f"{rootfs.root}/.", bundle / "rootfs/")
            sh("umoci", "repack", "--image", image, bundle)
        sh("umoci", "config", "--image", image, "--os", "linux", "--architecture", "amd64",
           "--created", "2000-01-01T00:00:00Z", "--config.env", PATH_ENV, *config)
        tags = [tag]
        for extra in extra_tags:
            if extra not in tags:
                sh("umoci", "tag", "--image", image, extra)
                tags.append(extra)
        sh("umoci", "gc", "--layout", layout)
        self.rows.append(f"{name}\t{repo}\t{','.join(tags)}\t{kind}\t{note}")
        print(f"image {repo}:{{{','.join(tags)}}} ({kind})")

    def finish(self):
        (self.dir / "images.tsv").write_text("\n".join(self.rows) + "\n")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, out_dir = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    if os.geteuid() != 0:
        sys.exit("conformance-images.py: run as root (file ownership, setuid bits)")
    binaries = out_dir / "bin"
    for b in ["agnhost", "sample-apiserver", "nnp"]:
        if not (binaries / b).exists():
            sys.exit(f"missing {binaries / b}: build it first (conformance.sh build)")
    ensure_packages()
    manifest = Manifest(src)
    images = Images(out_dir)
    work = Path(tempfile.mkdtemp(prefix="image-work-", dir=out_dir))
    version = lambda pkg: out("dpkg-query", "-W", "-f", "${Version}", pkg)

    busybox = Rootfs(work, "busybox")
    # Debian's busybox 1.35 ash drops environment variables whose names are not shell
    # identifiers (`data-1`, from envFrom) before it runs a command; the upstream image's
    # busybox passes them on, as the ConfigMap/Secret envFrom specs check with `sh -c env`.
    # bash (as sh, in POSIX mode) passes them on too.
    (busybox.root / "bin/sh").unlink()
    busybox.add("/bin/bash", "/bin/sh")
    images.register(manifest.name("BusyBox"), busybox, "stand-in",
                    f"Debian busybox-static {version('busybox-static')}, bash as sh",
                    ["--config.cmd", "sh"])

    pause = Rootfs(work, "pause", busybox=False)
    pause_tag = manifest.name("Pause")[1]
    sh("gcc", "-Os", "-static", f'-DVERSION="v{pause_tag}-orquestra"', "-o", pause.root / "pause",
       src / "build/pause/linux/pause.c")
    sh("strip", pause.root / "pause")
    images.register(manifest.name("Pause"), pause, "real", "build/pause/linux/pause.c, static",
                    ["--config.entrypoint", "/pause", "--config.user", "65535:65535"])

    agnhost = Rootfs(work, "agnhost")
    agnhost.add(str(binaries / "agnhost"), "/agnhost")
    (agnhost.root / "agnhost-2").symlink_to("agnhost")
    for tool in ["/usr/bin/curl", "/usr/bin/dig", "/usr/bin/nslookup", "/usr/bin/host",
                 "/usr/bin/getent"]:
        agnhost.add(tool)
    agnhost.add("/bin/nc.openbsd", "/usr/bin/nc")
    agnhost.add("/usr/bin/bash", "/bin/bash")
    # Debian's busybox-static ash runs its own applets before PATH (a "standalone" shell), so
    # `sh -c 'nc -u …'` got busybox's nc, which has no -u, and `nslookup` busybox's; Alpine's
    # ash (the real image's) finds the netcat-openbsd and bind-tools it installs. bash as sh
    # finds them too.
    (agnhost.root / "bin/sh").unlink()
    agnhost.add("/usr/bin/bash", "/bin/sh")
    (agnhost.root / "uploads").mkdir()
    if Path("/etc/ssl/certs/ca-certificates.crt").exists():
        agnhost.write("/etc/ssl/certs/ca-certificates.crt",
                      Path("/etc/ssl/certs/ca-certificates.crt").read_text())
    porter = src / "test/images/agnhost/porter"
    agnhost.write("/localhost.crt", (porter / "localhost.crt").read_text())
    agnhost.write("/localhost.key", (porter / "localhost.key").read_text(), 0o600)
    # As agnhost's Dockerfile: a user and groups the security-context specs look for.
    with open(agnhost.root / "etc/passwd", "a") as f:
        f.write("user-defined-in-image:x:1000:1000::/home/user-defined-in-image:/bin/sh\n")
    with open(agnhost.root / "etc/group", "a") as f:
        f.write("user-defined-in-image:x:1000:\ngroup-defined-in-image:x:50000:user-defined-in-image\n")
    home = agnhost.root / "home/user-defined-in-image"
    home.mkdir(parents=True)
    os.chown(home, 1000, 1000)
    ports = [a for p in ["80", "8080", "8081", "9376", "5000"] for a in ["--config.exposedports", f"{p}/tcp"]]
    agnhost_version = (src / "test/images/agnhost/VERSION").read_text().strip()
    previous = manifest.name("AgnhostPrev")[1]
    images.register(manifest.name("Agnhost"), agnhost, "real",
                    f"agnhost {agnhost_version} from source with Debian curl/dig/nc, bash as sh; "
                    f"tag {previous} is a stand-in (the same build)",
                    ["--config.entrypoint", "/agnhost", "--config.cmd", "pause", *ports],
                    extra_tags=(previous,))
    for pet in ["Kitten", "Nautilus"]:
        copy = Rootfs(work, pet.lower(), busybox=False)
        shutil.rmtree(copy.root)
        shutil.copytree(agnhost.root, copy.root, symlinks=True)
        for page in (src / f"test/images/{pet.lower()}/html").iterdir():
            shutil.copy2(page, copy.root / page.name)
        images.register(manifest.name(pet), copy, "real", "the agnhost image with its html pages",
                        ["--config.entrypoint", "/agnhost", "--config.cmd", "test-webserver",
                         "--config.exposedports", "80/tcp"])

    nginx = Rootfs(work, "nginx")
    debs = work / "nginx-debs"
    debs.mkdir()
    fetched = subprocess.run(["apt-get", "download", "nginx", "nginx-common"], cwd=debs)
    if fetched.returncode != 0:
        sh("apt-get", "update", "-qq")
        sh("apt-get", "download", "nginx", "nginx-common", cwd=debs)
    unpacked = work / "nginx-files"
    for deb in debs.glob("*.deb"):
        sh("dpkg-deb", "-x", deb, unpacked)
    nginx.add(str(unpacked / "usr/sbin/nginx"), "/usr/sbin/nginx")
    for d in ["usr/share/nginx/html", "var/lib/nginx/body", "var/lib/nginx/proxy", "var/cache/nginx",
              "var/log/nginx", "etc/nginx/conf.d"]:
        (nginx.root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(unpacked / "etc/nginx/mime.types", nginx.root / "etc/nginx/mime.types")
    nginx.write("/etc/nginx/nginx.conf",
                "user nginx;\nworker_processes 1;\nerror_log stderr notice;\npid /run/nginx.pid;\n"
                "events { worker_connections 1024; }\nhttp {\n  include /etc/nginx/mime.types;\n"
                "  default_type application/octet-stream;\n  access_log /dev/stdout;\n"
                "  keepalive_timeout 65;\n  include /etc/nginx/conf.d/*.conf;\n}\n")
    nginx.write("/etc/nginx/conf.d/default.conf",
                "server {\n  listen 80;\n  server_name localhost;\n"
                "  location / { root /usr/share/nginx/html; index index.html; }\n}\n")
    page = "<!DOCTYPE html>\n<html>\n<head>\n<title>Welcome to nginx!</title>\n</head>\n<body>\n" \
           "<h1>Welcome to nginx!</h1>\n</body>\n</html>\n"
    nginx.write("/usr/share/nginx/html/index.html", page)
    for d in ["var/lib/nginx", "var/cache/nginx"]:
        sh("chown", "-R", "101:101", nginx.root / d)
    images.register(manifest.name("Nginx"), nginx, "real",
                    f"Debian nginx {out('dpkg-deb', '-f', next(debs.glob('nginx_*.deb')), 'Version').strip()}",
                    ["--config.cmd", "nginx", "--config.cmd", "-g", "--config.cmd", "daemon off;",
                     "--config.exposedports", "80/tcp", "--config.stopsignal", "SIGQUIT"],
                    extra_tags=(manifest.name("NginxNew")[1],))

    dns = Rootfs(work, "glibc-dns-testing")
    for tool in ["/usr/bin/dig", "/usr/bin/nslookup", "/usr/bin/host", "/usr/bin/getent"]:
        dns.add(tool)
    dns.add("/usr/bin/bash", "/bin/bash")
    images.register(manifest.name("GlibcDnsTesting"), dns, "real",
                    "Debian dig/host/nslookup, glibc getent, bash", ["--config.cmd", "bash"])

    sample = Rootfs(work, "sample-apiserver")
    sample.add(str(binaries / "sample-apiserver"), "/sample-apiserver")
    images.register(manifest.name("APIServer"), sample, "real",
                    "k8s.io/sample-apiserver from this source tree",
                    ["--config.entrypoint", "/sample-apiserver"])

    etcd = Rootfs(work, "etcd")
    etcd.add("/usr/bin/etcd", "/usr/local/bin/etcd")
    etcd.add("/usr/bin/etcdctl", "/usr/local/bin/etcdctl")
    (etcd.root / "var/lib/etcd").mkdir(parents=True)
    images.register(manifest.name("Etcd"), etcd, "real",
                    f"Debian etcd-server {version('etcd-server')} (older than the tag)",
                    ["--config.cmd", "/usr/local/bin/etcd"])

    nnp = Rootfs(work, "nonewprivs")
    nnp.add(str(binaries / "nnp"), "/usr/local/bin/nnp", mode=0o4755)
    images.register(manifest.name("Nonewprivs"), nnp, "real", "test/images/nonewprivs, setuid",
                    ["--config.cmd", "nnp"])

    nonroot = Rootfs(work, "nonroot")
    images.register(manifest.name("NonRoot"), nonroot, "real", "busybox, USER 1234",
                    ["--config.user", "1234", "--config.cmd", "sh"])

    images.finish()
    shutil.rmtree(work)
    print(f"wrote {images.dir / 'images.tsv'}")


if __name__ == "__main__":
    main()
