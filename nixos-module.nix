# NixOS module for nixspool: `services.nixspool.enable = true` gives a
# socket-activated, hardened agentd and wires its hook into nix.conf.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkEnableOption mkOption mkIf types literalExpression concatStringsSep
    optional optionals optionalString hasPrefix hasInfix escapeShellArg mapAttrsToList;

  cfg = config.services.nixspool;

  socketDir = "/run/nixspool";
  socketPath = "${socketDir}/agentd.sock";
  stateDir = "/var/lib/nixspool";
  gcRootsDir = "/nix/var/nix/gcroots/nixspool";

  inStore = p: hasPrefix "/nix/store/" (toString p);

  # What agentctl accepts: a number of days, or a Go duration.
  isDuration = d: builtins.match "[0-9]+(\\.[0-9]+)?d|([0-9]+(\\.[0-9]+)?(ns|us|ms|s|m|h))+" d != null;

  cacheUrl =
    if cfg.compression == null then cfg.cache
    else cfg.cache + (if hasInfix "?" cfg.cache then "&" else "?") + "compression=${cfg.compression}";

  settingArgs = concatStringsSep " " (mapAttrsToList (name: value:
    if builtins.isBool value then (if value then "--${name}" else "--${name}=false")
    else if builtins.isList value then concatStringsSep " " (map (v: "--${name}=${escapeShellArg (toString v)}") value)
    else "--${name}=${escapeShellArg (toString value)}") cfg.settings);

  # Secret key files reach agentd through LoadCredential (never the store).
  keyCredentials = lib.imap0 (i: f: { name = "secret-key-${toString i}"; path = f; }) cfg.secretKeyFiles;

  agentdArgs = concatStringsSep " " ([
    "--cache ${escapeShellArg cacheUrl}"
    "--state-dir ${stateDir}"
    "--socket ${socketPath}"
    "--gc-roots ${if cfg.gcRoots then gcRootsDir else "off"}"
    "--jobs ${toString cfg.jobs}"
    "--capture ${cfg.capture}"
  ]
  ++ map (k: "--secret-key-file \${CREDENTIALS_DIRECTORY}/${k.name}") keyCredentials
  ++ optional (cfg.adminGroup != null) "--admin-group ${escapeShellArg cfg.adminGroup}"
  ++ optional (cfg.metrics.listen != null) "--metrics-listen ${escapeShellArg cfg.metrics.listen}"
  ++ optional (cfg.settings != { }) settingArgs
  ++ map escapeShellArg cfg.extraArgs);

  # NixOS allows one post-build-hook: ours queues the outputs, then runs the
  # extra hooks, each bounded by its timeout and never failing the build.
  postBuildHook = pkgs.writeShellScript "nixspool-post-build-hook" (''
    export NIXSPOOL_SOCKET=${socketPath}
    export NIXSPOOL_STATE_DIR=${stateDir}
    export NIXSPOOL_GC_ROOTS=${if cfg.gcRoots then gcRootsDir else "off"}
    ${cfg.package}/bin/nixspool-hook
  '' + concatStringsSep "\n" (map (h: ''
    ${pkgs.coreutils}/bin/timeout --kill-after=5 ${escapeShellArg h.timeout} ${h.command} </dev/null \
      || echo "nixspool: extra post-build hook failed or timed out (ignored): ${lib.escape [ "\"" "$" "`" "\\" ] h.command}" >&2
  '') cfg.extraPostBuildHooks) + "\nexit 0\n");
in
{
  options.services.nixspool = {
    enable = mkEnableOption "nixspool, which uploads every local Nix build to a binary cache";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The nixspool package (provides nixspool-hook, agentd and agentctl).";
    };

    cache = mkOption {
      type = types.str;
      example = "s3://my-nix-cache?region=eu-west-1";
      description = ''
        Binary cache URL, as Nix writes it: `s3://BUCKET[/PREFIX]?endpoint=https://HOST&region=R&profile=P`
        with any parameter of Nix's S3 store (`compression`, `write-nar-listing`, `storage-class`,
        `multipart-chunk-size`, …; see docs/configuration.md, "Cache URL parameters"), or `file:///DIR`.
        S3 credentials never go here; see `credentialsFile`. Prefer `secretKeyFiles` to
        `secret-key=` here: those reach agentd through `LoadCredential=`.
      '';
    };

    secretKeyFiles = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "/var/lib/secrets/nixspool/cache-1.key" ];
      description = ''
        Nix secret signing keys (`nix key generate-secret --key-name NAME`), as paths
        outside the Nix store: they are handed to agentd with `LoadCredential=` and never
        copied into the store. Every uploaded narinfo is signed with each key.
      '';
    };

    credentialsFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/var/lib/secrets/nixspool/s3.env";
      description = ''
        Environment file with the S3 credentials (`AWS_ACCESS_KEY_ID=…`,
        `AWS_SECRET_ACCESS_KEY=…`), outside the Nix store. Leave null to use an
        instance role or a `profile=` from a shared credentials file.
      '';
    };

    compression = mkOption {
      type = types.nullOr (types.enum [ "zstd" "xz" "br" "gzip" "lz4" "none" ]);
      default = null;
      description = "NAR compression (null: the cache URL's `compression=`, else zstd).";
    };

    capture = mkOption {
      type = types.enum [ "hook" "local" "all" ];
      default = "hook";
      description = ''
        Which paths are uploaded besides those the post-build hook and `agentctl push` hand
        over (`agentd --capture`). `hook`: none. `local`: also every path built or added on
        this machine (evaluation sources, `nix-store --add`, import-from-derivation results,
        builds the hook missed, e.g. while the agent was not installed). `all`: also paths
        substituted from other caches or copied in (`nix copy --from`, `nix-store --import`).
        Paths signed by a `skip-signed-by` key (default `cache.nixos.org-1`) are left out in
        every mode. The store watcher reads Nix's database read-only every second.
      '';
    };

    jobs = mkOption {
      type = types.ints.between 1 256;
      default = 64;
      description = "Jobs (paths handed over) worked on at once; their NARs share one bounded pool, and requests to the bucket one adaptive window (`settings.max-requests`, default 128).";
    };

    gcRoots = mkOption {
      type = types.bool;
      default = true;
      description = "Keep queued paths alive with GC roots under ${gcRootsDir} until they are uploaded.";
    };

    socketGroup = mkOption {
      type = types.str;
      default = "nixspool";
      description = ''
        Group that may use the agent's socket to queue paths (the post-build hook runs as
        root; members may `agentctl push`, `status`, `list`, `watch`, `wait`, `doctor`,
        `audit`, `pins`): the socket is 0660 root:socketGroup in a 0755 directory, so the
        socket's mode is who may connect. Members may not `gc`, `forget`, `drop`, `retry`,
        `pin` or `unpin`; see `adminGroup`. The group is created if it is the default.
      '';
    };

    adminGroup = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "nixspool-admin";
      description = ''
        Group whose members may also run the operator's commands, which change what others
        rely on: `agentctl gc`, `forget`, `drop`, `retry`, `pin`, `unpin` (null: root only).
        The group must exist (`users.groups`), and its members reach the socket only if they
        are in `socketGroup` too. Each such request is logged by agentd with the caller's uid.
      '';
    };

    gc = {
      enable = mkEnableOption ''
        garbage collection of the cache by this machine: a systemd timer runs
        `agentctl gc`, which this machine's agentd carries out. Enable it on one machine
        per bucket (a second collector is refused while one runs); every machine that
        uploads to the bucket must run nixspool, whose agents keep their uploads safe
        while a cycle runs'';

      keepSince = mkOption {
        type = types.str;
        default = "30d";
        example = "90d";
        description = ''
          Keep every path written or re-written within this time, with its closure
          (`30d`, `720h`, …). Pins (`agentctl pin`) are kept regardless. Nix clients cache
          positive narinfo lookups for 30 days by default: a shorter retention can make
          them try paths that were just collected.
        '';
      };

      grace = mkOption {
        type = types.str;
        default = "2h";
        description = ''
          Time between announcing what a cycle deletes and deleting it. Every agent must
          read announcements well within it (agentd's `--gc-poll-interval`, 20s by
          default); the collector refuses a grace too short for a registered agent.
        '';
      };

      dates = mkOption {
        type = types.str;
        default = "weekly";
        example = "Sun 03:00";
        description = "When to run, as a systemd calendar expression (OnCalendar=).";
      };
    };

    metrics.listen = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "127.0.0.1:9443";
      description = "Address for the Prometheus metrics endpoint (off when null).";
    };

    settings = mkOption {
      type = with types; attrsOf (oneOf [ str int bool (listOf str) ]);
      default = { };
      example = { shutdown-grace = "1m"; max-attempts = 50; log-format = "json"; exclude = [ "-source$" ]; };
      description = "Further agentd flags, `name = value` for `--name=value` (lists repeat the flag).";
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "Extra command-line arguments for agentd.";
    };

    extraPostBuildHooks = mkOption {
      type = types.listOf (types.submodule {
        options = {
          command = mkOption { type = types.str; description = "Command to run after nixspool queued the outputs (it sees OUT_PATHS and DRV_PATH)."; };
          timeout = mkOption { type = types.str; default = "30s"; description = "Time limit (coreutils timeout syntax)."; };
        };
      });
      default = [ ];
      description = ''
        Other post-build hooks to run (NixOS has a single `post-build-hook`). They run after
        the outputs are queued, each with its own timeout; their failure never fails the build.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.secretKeyFiles != [ ] || hasInfix "secret-key" cfg.cache;
        message = "services.nixspool.secretKeyFiles must name at least one signing key (nix key generate-secret --key-name NAME > /var/lib/secrets/nixspool.key), unless the cache URL has secret-key=.";
      }
      {
        assertion = hasPrefix "s3://" cfg.cache || hasPrefix "file:///" cfg.cache;
        message = "services.nixspool.cache must be an s3://BUCKET?… or file:///DIR URL, not \"${cfg.cache}\".";
      }
      {
        assertion = !(cfg.compression != null && hasInfix "compression=" cfg.cache);
        message = "services.nixspool: set the compression either in `cache` (compression=…) or in `compression`, not both.";
      }
      {
        assertion = cfg.credentialsFile == null || !(inStore cfg.credentialsFile);
        message = "services.nixspool.credentialsFile ${toString cfg.credentialsFile} is in the Nix store, where every user can read it; keep it outside the store (e.g. /var/lib/secrets).";
      }
      {
        assertion = !cfg.gc.enable || (isDuration cfg.gc.keepSince && isDuration cfg.gc.grace);
        message = "services.nixspool.gc: keepSince and grace must be durations such as 30d, 12h or 90m (got \"${cfg.gc.keepSince}\" and \"${cfg.gc.grace}\").";
      }
    ] ++ map (f: {
      assertion = !(inStore f);
      message = "services.nixspool.secretKeyFiles: ${f} is in the Nix store, where every user can read it; keep signing keys outside the store (e.g. /var/lib/secrets).";
    }) cfg.secretKeyFiles;

    users.groups = mkIf (cfg.socketGroup == "nixspool") { nixspool = { }; };

    environment.systemPackages = [ cfg.package ];

    nix.settings.post-build-hook = postBuildHook;

    # systemd creates the socket's directory root:root with DirectoryMode=;
    # the rule also fixes the mode of a directory an older version made 0750
    # (/run survives a configuration switch), which kept the group out.
    systemd.tmpfiles.rules = [ "d ${socketDir} 0755 root root -" ]
      ++ optionals cfg.gcRoots [ "d ${gcRootsDir} 0755 root root -" ];

    systemd.sockets.nixspool = {
      description = "nixspool agent socket";
      wantedBy = [ "sockets.target" ];
      socketConfig = {
        ListenStream = socketPath;
        SocketMode = "0660";
        SocketUser = "root";
        SocketGroup = cfg.socketGroup;
        # The group must reach the socket: the directory is open, the
        # socket's 0660 is what keeps other users out.
        DirectoryMode = "0755";
        Backlog = 512;
      };
    };

    # One gc cycle per timer tick, carried out by agentd (which holds the
    # credentials); the unit stays active for the grace and the sweep.
    systemd.services.nixspool-gc = mkIf cfg.gc.enable {
      description = "nixspool: garbage-collect the binary cache";
      requires = [ "nixspool.socket" ];
      after = [ "nixspool.socket" "nixspool.service" "network-online.target" ];
      wants = [ "network-online.target" ];
      script = "exec ${cfg.package}/bin/agentctl --socket ${socketPath} gc --keep-since ${escapeShellArg cfg.gc.keepSince} --grace ${escapeShellArg cfg.gc.grace}";
      serviceConfig = {
        Type = "oneshot";
        TimeoutStartSec = "infinity";
        User = "root";
        CapabilityBoundingSet = "";
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateNetwork = true;
        RestrictAddressFamilies = [ "AF_UNIX" ];
      };
    };

    systemd.timers.nixspool-gc = mkIf cfg.gc.enable {
      description = "nixspool: garbage-collect the binary cache (${cfg.gc.dates})";
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnCalendar = cfg.gc.dates;
        Persistent = true;
        RandomizedDelaySec = "10min";
      };
    };

    systemd.services.nixspool = {
      description = "nixspool agent: uploads Nix build results to a binary cache";
      requires = [ "nixspool.socket" ];
      after = [ "nixspool.socket" "network-online.target" "nix-daemon.socket" ];
      wants = [ "network-online.target" ];
      wantedBy = [ "multi-user.target" ];
      path = [ config.nix.package ];
      script = "exec ${cfg.package}/bin/agentd ${agentdArgs}";
      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        LoadCredential = map (k: "${k.name}:${k.path}") keyCredentials;
        EnvironmentFile = optional (cfg.credentialsFile != null) cfg.credentialsFile;
        StateDirectory = "nixspool";
        StateDirectoryMode = "0700";
        Restart = "on-failure";
        RestartSec = "2s";
        WatchdogSec = "2min";
        TimeoutStopSec = "45s";
        KillMode = "mixed";

        # Root without any capability; see systemd/nixspool.service for why.
        User = "root";
        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        # The store watcher (capture local/all) only reads Nix's database,
        # but an SQLite reader of a WAL database maps its -shm file (the
        # shared wal-index) read-write: on a read-only mount it cannot open
        # it at all.
        ReadWritePaths = optional cfg.gcRoots "-${gcRootsDir}"
          ++ optional (cfg.capture != "hook") "/nix/var/nix/db";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "~@privileged" ];
        SystemCallErrorNumber = "EPERM";
        UMask = "0077";
      };
    };
  };
}
