#!/bin/bash
# Prepare .gpu/ for benchmarks/device_check.sh, on the workstation, in the repository root:
# the cp312 wheels the GPU image lacks and this machine's nginx with its libraries (the GPU
# machine has no network and no nginx). .gpu/ is kept out of git (.git/info/exclude) and
# travels with the device call (carry: [".gpu"]); it is about 40 MB of the 64 MiB a call
# may carry. Then, on the device tool: run(command="bash benchmarks/device_check.sh",
# carry=[".gpu"], timeout_s=540), and copy $OUT's files to benchmarks/results/.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
EXCLUDE="$(git rev-parse --git-common-dir)/info/exclude"
grep -qx "/.gpu/" "$EXCLUDE" 2>/dev/null || echo "/.gpu/" >> "$EXCLUDE"
rm -rf .gpu && mkdir -p .gpu/whl .gpu/bin .gpu/lib
PLATFORMS=()
for n in 2_28 2_27 2_24 2_17 2014 1; do
  case $n in 2014) PLATFORMS+=(--platform manylinux2014_x86_64);; 1) PLATFORMS+=(--platform manylinux1_x86_64);;
    *) PLATFORMS+=(--platform "manylinux_${n}_x86_64");; esac
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d .gpu/whl pycurl simplejpeg shapely tomli_w duckdb
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
cp "$NGINX" .gpu/bin/nginx.real
for lib in libcrypt.so.1 libpcre2-8.so.0 libssl.so.3 libcrypto.so.3 libz.so.1; do
  cp "$(ldd "$NGINX" | awk -v l="$lib" '$1 == l {print $3}')" .gpu/lib/
done
cat > .gpu/bin/nginx <<'EOF'
#!/bin/bash
here=$(cd "$(dirname "$0")" && pwd)
LD_LIBRARY_PATH="$here/../lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/nginx.real" "$@"
EOF
chmod +x .gpu/bin/nginx
du -sh .gpu .gpu/whl/* | sed 's/^/  /'
