# shellcheck shell=bash
# What the test suite runs that this repository does not build, the Debian package that
# provides it, and a probe that proves it works.  Sourced by tests/run, which installs the
# package of every failing probe and then requires every probe to pass, and by
# `tests/run --check-fresh`, which does the same in a minimal Debian.
#
# A probe runs the tool (`--version` or the like) or imports the module, so a broken
# install fails it: a command on PATH or a package marked installed proves nothing
# (python3-pymodbus is "installed" without the python3-serial its server imports).
# Packages are installed without recommends: everything needed is named here.

# The table: TOOL PACKAGE PROBE a row; PROBE is the rest of the row, run by bash with stdin
# from /dev/null for 60 s at most, and passes when it exits 0.
tools_table() {
    cat <<'EOF'
# TOOL                PACKAGE                 PROBE
# cargo build: the linker, and the C compiler of rusqlite (bundled SQLite) and ring.
cc                    gcc                     cc --version
# tests/run and every broker test; mosquitto -h prints its version and exits 3.
mosquitto             mosquitto               mosquitto -h 2>&1 | grep -q "^mosquitto version "
mosquitto_passwd      mosquitto               mosquitto_passwd --help 2>&1 | grep -q "^mosquitto_passwd is a tool"
mosquitto_pub         mosquitto-clients       mosquitto_pub --version 2>&1 | grep -q "^mosquitto_pub version "
influxd               influxdb                influxd version
victoria-metrics      victoria-metrics        victoria-metrics -version
mbpoll                mbpoll                  mbpoll -V
# tests/interop/pymodbus_server.py runs on Debian's python3 (tomllib: 3.11 or later)
# and imports pymodbus.server, which imports serial and serial_asyncio (pymodbus only
# recommends them).
python3               python3                 /usr/bin/python3 -c "import argparse, asyncio, tomllib"
serial                python3-serial          /usr/bin/python3 -c "import serial"
serial_asyncio        python3-serial-asyncio  /usr/bin/python3 -c "import serial_asyncio"
pymodbus              python3-pymodbus        /usr/bin/python3 -c "import pymodbus.constants, pymodbus.datastore, pymodbus.payload, pymodbus.server"
socat                 socat                   socat -V
curl                  curl                    curl --version
openssl               openssl                 openssl version
# the backup command of the README (tests/tests/readme.rs runs it)
sqlite3               sqlite3                 sqlite3 --version
chromium              chromium                chromium --version
chromedriver          chromium-driver         chromedriver --version
# the console screenshots and the benchmark plot
DejaVuSans.ttf        fonts-dejavu-core       test -r /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
systemd-analyze       systemd                 systemd-analyze --version
# the tests signal their children with kill (not the shell builtin) and pkill
kill                  procps                  env kill --version
pkill                 procps                  pkill --version
id                    coreutils               id --version
EOF
}

# apt-get install as tests/run runs it: recommends off, so only what is listed comes in.
# shellcheck disable=SC2034 # used by tests/run, which sources this file
TOOLS_APT_INSTALL=(apt-get install -y -q --no-install-recommends)

# The table's rows without comments: "TOOL PACKAGE PROBE" a line.
tools_rows() {
    local line
    while IFS= read -r line; do
        [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
        printf '%s\n' "$line"
    done < <(tools_table)
}

# Every package of the table, each once, in table order.
tools_packages() {
    local tool pkg probe seen=" "
    while read -r tool pkg probe; do
        [[ "$seen" == *" $pkg "* ]] && continue
        seen+="$pkg "
        printf '%s\n' "$pkg"
    done < <(tools_rows)
}

# tools_probe [RUNNER...]: run every probe, through RUNNER when given (e.g. a chroot
# command; the probe is appended as `timeout 60 bash -c PROBE`).  Sets
#   PROBE_PASSED  the tools whose probe passed
#   PROBE_FAILED  the packages of the failed probes, each once, in table order
#   PROBE_REPORT  one line a failed probe: tool, package, probe, its last output line
#   PROBE_LINES   one line a probe, in table order: "ok" or "FAILED", tool, package
# and returns 1 when any probe failed.
tools_probe() {
    PROBE_PASSED=()
    PROBE_FAILED=()
    PROBE_REPORT=()
    PROBE_LINES=()
    local tool pkg probe out
    while read -r tool pkg probe; do
        if out="$("$@" timeout 60 bash -c "$probe" 2>&1 </dev/null)"; then
            PROBE_PASSED+=("$tool")
            PROBE_LINES+=("ok      $tool ($pkg): $probe")
            continue
        fi
        [[ " ${PROBE_FAILED[*]} " == *" $pkg "* ]] || PROBE_FAILED+=("$pkg")
        out="$(tail -n 1 <<<"$out")"
        PROBE_REPORT+=("$tool (package $pkg): \`$probe\` failed${out:+: $out}")
        PROBE_LINES+=("FAILED  ${PROBE_REPORT[-1]}")
    done < <(tools_rows)
    ((${#PROBE_FAILED[@]} == 0))
}
