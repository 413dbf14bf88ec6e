#!/usr/bin/env bash
# Sourced by scripts/test.sh and scripts/chaos.sh: installs what is missing and starts the
# servers the project needs, on a fresh Debian machine (as root) as on our dev machines.
#
#   source scripts/servers.sh && ensure_servers
#
# 1. Installs what is missing (apt-get: postgresql, rabbitmq-server, a C linker; rustup when
#    there is no cargo), only when missing.
# 2. Starts PostgreSQL on 127.0.0.1:5432 and RabbitMQ (with its AMQP 1.0 and consistent-hash
#    exchange plugins) on 127.0.0.1:5672 when they are not answering, and waits for them with a
#    deadline. A server that cannot be reached fails the caller: tests are never skipped.
# 3. Declares the AMQP topology of the examples (scripts/amqp-topology.sh).
#
# Idempotent. Reads WHIZBANG_TEST_DATABASE_URL, WHIZBANG_TEST_AMQP_URL (defaults below) and
# SERVER_TIMEOUT (seconds to wait for each server, default 90); exports the first two and puts
# cargo on PATH.

export WHIZBANG_TEST_DATABASE_URL="${WHIZBANG_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export WHIZBANG_TEST_AMQP_URL="${WHIZBANG_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672}"
SERVER_TIMEOUT="${SERVER_TIMEOUT:-90}"

step() { printf '\n==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() {
    printf "\n%s: FAILED: %s\n" "${0##*/}" "$*" >&2
    exit 1
}

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null || die "cannot install $* : no apt-get on this machine"
    if [[ $APT_UPDATED -eq 0 ]]; then
        note "apt-get update"
        as_root apt-get update -qq || die "apt-get update failed"
        APT_UPDATED=1
    fi
    note "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" ||
        die "apt-get install $* failed"
}

installed() { dpkg -s "$1" >/dev/null 2>&1; }

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# True when 127.0.0.1:5672 (or the port given) speaks AMQP 1.0: it answers the AMQP 1.0 SASL
# protocol header with the same header. (RabbitMQ without the plugin answers with its 0-9-1 header instead; the port
# opens before the plugin is ready, so the open port alone proves nothing.)
amqp10_ready() {
    local answer port=${1:-5672}
    answer=$(timeout 3 bash -c \
        "exec 3<>/dev/tcp/127.0.0.1/$port && printf 'AMQP\\x03\\x01\\x00\\x00' >&3 && head -c 8 <&3 | od -An -tx1" \
        2>/dev/null) || return 1
    [[ ${answer//[[:space:]]/} == 414d515003010000 ]]
}

# wait_for DESCRIPTION COMMAND...: polls COMMAND until it succeeds or SERVER_TIMEOUT passes.
wait_for() {
    local what=$1
    shift
    local deadline=$((SECONDS + SERVER_TIMEOUT))
    until "$@"; do
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 0.5
    done
    note "$what: ready"
}

# Step 1 alone: what scripts/chaos.sh needs before it starts servers of its own.
ensure_packages() {
    # ---- 1. Tools ---------------------------------------------------------------------------

    step "tools"
    [[ -x $HOME/.cargo/bin/cargo ]] && export PATH="$HOME/.cargo/bin:$PATH"
    # The crate uses edition 2024: cargo 1.85 or newer (Debian's own cargo is older).
    cargo_ok() {
        local v
        v=$(cargo --version 2>/dev/null | awk '{print $2}') && [[ -n $v ]] &&
            printf '1.85.0\n%s\n' "${v%%-*}" | sort -V -C
    }
    missing=()
    installed postgresql || command -v pg_ctlcluster >/dev/null || missing+=(postgresql)
    command -v psql >/dev/null && command -v pg_isready >/dev/null || missing+=(postgresql-client)
    installed rabbitmq-server || command -v rabbitmq-server >/dev/null || missing+=(rabbitmq-server)
    command -v cc >/dev/null || missing+=(gcc libc6-dev)
    installed libssl-dev && command -v pkg-config >/dev/null || missing+=(libssl-dev pkg-config) # amqps:// (native-tls)
    if ! cargo_ok; then
        command -v curl >/dev/null || missing+=(curl ca-certificates)
    fi
    if ((${#missing[@]})); then
        apt_install "${missing[@]}"
    else
        note "postgresql, rabbitmq-server and a C toolchain are installed"
    fi

    if ! cargo_ok; then
        note "installing the stable Rust toolchain with rustup"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
            sh -s -- -y --profile minimal --component rustfmt,clippy ||
            die "rustup installation failed"
        export PATH="$HOME/.cargo/bin:$PATH"
        cargo_ok || die "cargo 1.85 or newer is needed, found: $(cargo --version 2>&1)"
    fi
    if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
        command -v rustup >/dev/null || die "cargo fmt / cargo clippy missing and no rustup to add them"
        rustup component add rustfmt clippy || die "cannot add rustfmt and clippy"
    fi
    note "$(cargo --version)"
}

ensure_servers() {
    ensure_packages

    # ---- 2. PostgreSQL ----------------------------------------------------------------------

    step "PostgreSQL (127.0.0.1:5432)"
    pg_version=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1)
    pg_ready() { pg_isready -q -h 127.0.0.1 -p 5432; }
    if pg_ready; then
        note "already accepting connections"
    else
        [[ -n $pg_version ]] || die "PostgreSQL is installed but /usr/lib/postgresql has no version"
        if [[ ! -d /etc/postgresql/$pg_version/main ]]; then
            note "creating cluster $pg_version/main"
            as_root pg_createcluster "$pg_version" main || die "pg_createcluster $pg_version main failed"
        fi
        note "starting cluster $pg_version/main"
        as_root pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start ||
            die "pg_ctlcluster $pg_version main start failed (see /var/log/postgresql/)"
        wait_for "PostgreSQL" pg_ready ||
            die "PostgreSQL is not accepting connections on 127.0.0.1:5432 after ${SERVER_TIMEOUT}s"
    fi

    pg_login() { PGCONNECT_TIMEOUT=5 psql "$WHIZBANG_TEST_DATABASE_URL" -XAtqc 'select 1' >/dev/null 2>&1; }
    pg_login_error() { PGCONNECT_TIMEOUT=5 psql "$WHIZBANG_TEST_DATABASE_URL" -XAtqc 'select 1' 2>&1 | head -n 1; }
    default_url_re='^postgres(ql)?://postgres@(127\.0\.0\.1|localhost)(:5432)?/'
    if ! pg_login; then
        # A fresh Debian cluster asks 127.0.0.1 for a password: let user postgres in from the
        # loopback interface without one (trust), as the tests connect. Only for the default
        # passwordless URL; any other URL must work as given.
        [[ $WHIZBANG_TEST_DATABASE_URL =~ $default_url_re ]] ||
            die "cannot log in with WHIZBANG_TEST_DATABASE_URL: $(pg_login_error)"
        hba=/etc/postgresql/$pg_version/main/pg_hba.conf
        [[ -n $pg_version ]] && as_root test -f "$hba" ||
            die "cannot log in to $WHIZBANG_TEST_DATABASE_URL and no local pg_hba.conf to fix"
        if ! as_root grep -q '^host all postgres 127.0.0.1/32 trust' "$hba"; then
            note "allowing user postgres from 127.0.0.1 and ::1 without a password in $hba"
            as_root sed -i -e '1i host all postgres 127.0.0.1/32 trust' \
                -e '1i host all postgres ::1/128 trust' "$hba" || die "cannot edit $hba"
            as_root pg_ctlcluster --skip-systemctl-redirect "$pg_version" main reload ||
                die "cannot reload PostgreSQL"
        fi
        wait_for "PostgreSQL login" pg_login ||
            die "cannot log in to $WHIZBANG_TEST_DATABASE_URL: $(pg_login_error)"
    fi
    note "login to $(sed -E 's#(//[^:/@]*):[^@]*@#\1:***@#' <<<"$WHIZBANG_TEST_DATABASE_URL"): ok"

    # ---- 3. RabbitMQ with AMQP 1.0 ----------------------------------------------------------

    step "RabbitMQ with AMQP 1.0 (127.0.0.1:5672)"
    # Both plugins in every call: `rabbitmq-plugins enable X` makes the node run exactly the
    # plugins of its enabled_plugins file plus X, so naming one alone can stop the other.
    # The consistent-hash exchange spreads the streams of a sharded subscription over its
    # shard queues (transport.amqp.shards).
    local plugins=(rabbitmq_amqp1_0 rabbitmq_consistent_hash_exchange)
    if amqp10_ready; then
        note "already speaking AMQP 1.0; making sure ${plugins[*]} are enabled"
        as_root rabbitmq-plugins enable "${plugins[@]}" >/dev/null ||
            die "rabbitmq-plugins enable ${plugins[*]} failed"
        wait_for "AMQP 1.0" amqp10_ready ||
            die "RabbitMQ does not speak AMQP 1.0 on 127.0.0.1:5672 after enabling ${plugins[*]}"
    elif port_open 5672; then
        note "running; enabling ${plugins[*]} live"
        as_root rabbitmq-plugins enable "${plugins[@]}" >/dev/null ||
            die "rabbitmq-plugins enable ${plugins[*]} failed"
        wait_for "AMQP 1.0" amqp10_ready ||
            die "RabbitMQ does not speak AMQP 1.0 on 127.0.0.1:5672 ${SERVER_TIMEOUT}s after enabling the plugin"
    else
        # The node name decides the pid file: the NODENAME of rabbitmq-env.conf, else rabbit@host.
        node=$(
            [[ -r /etc/rabbitmq/rabbitmq-env.conf ]] && . /etc/rabbitmq/rabbitmq-env.conf >/dev/null 2>&1
            echo "${RABBITMQ_NODENAME:-${NODENAME:-rabbit@$(hostname -s)}}"
        )
        note "starting node $node (loopback only) with ${plugins[*]}"
        as_root rabbitmq-plugins enable --offline "${plugins[@]}" >/dev/null ||
            die "rabbitmq-plugins enable --offline ${plugins[*]} failed"
        as_root env RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 ERL_EPMD_ADDRESS=127.0.0.1 \
            rabbitmq-server -detached || die "rabbitmq-server -detached failed"
        as_root rabbitmqctl wait --timeout "$SERVER_TIMEOUT" "/var/lib/rabbitmq/mnesia/$node.pid" >/dev/null ||
            die "RabbitMQ node $node did not start within ${SERVER_TIMEOUT}s (see /var/log/rabbitmq/)"
        wait_for "AMQP 1.0" amqp10_ready ||
            die "RabbitMQ started but does not speak AMQP 1.0 on 127.0.0.1:5672 after ${SERVER_TIMEOUT}s"
    fi

    step "AMQP topology (scripts/amqp-topology.sh)"
    scripts/amqp-topology.sh || die "cannot declare the AMQP topology on RabbitMQ"
}
