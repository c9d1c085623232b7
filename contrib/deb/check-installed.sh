#!/usr/bin/env bash
# After `dpkg -i` of the package: the installed layout is what the README
# promises, the packaged config passes check-config, and the installed unit
# passes systemd-analyze verify. Run by .ci/run.
set -euo pipefail
fail() { echo "check-installed: $*" >&2; exit 1; }
mode() { stat -c '%a %U %G' "$1"; }

[ -x /usr/bin/nexor-webhookd ] || fail "/usr/bin/nexor-webhookd is missing"
getent passwd nexor-webhookd >/dev/null || fail "no nexor-webhookd user"
[ "$(mode /etc/nexor-webhookd/config.toml)" = "640 root nexor-webhookd" ] \
    || fail "config.toml is $(mode /etc/nexor-webhookd/config.toml), not 640 root nexor-webhookd"
[ "$(mode /var/lib/nexor-webhookd)" = "700 nexor-webhookd nexor-webhookd" ] \
    || fail "/var/lib/nexor-webhookd is $(mode /var/lib/nexor-webhookd), not 700 nexor-webhookd nexor-webhookd"
dpkg-query -W -f='${Conffiles}\n' nexor-webhookd | grep -q ' /etc/nexor-webhookd/config.toml ' \
    || fail "config.toml is not a conffile"
[ -f /lib/systemd/system/nexor-webhookd.service ] || fail "the unit is missing"
runuser -u nexor-webhookd -- /usr/bin/nexor-webhookd check-config --config /etc/nexor-webhookd/config.toml
out=$(systemd-analyze verify --man=no /lib/systemd/system/nexor-webhookd.service 2>&1) || fail "systemd-analyze verify: $out"
if grep -q 'nexor-webhookd.service' <<<"$out"; then fail "systemd-analyze verify: $out"; fi
echo "check-installed: ok"
