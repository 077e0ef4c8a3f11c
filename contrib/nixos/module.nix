# NixOS module for narpipe: uploads every local build to a binary cache.
#
# Nix's post-build-hook runs `send`, which writes the built paths to the FIFO
# /run/narpipe.fifo. systemd owns that FIFO (narpipe.socket) and hands it to the
# long-running `upload` (narpipe-upload.service, socket-activated, Type=notify), which
# records them in /var/lib/narpipe and uploads them with their closures. Stopping the
# service drains it (SIGHUP); paths sent while it is down wait in the pipe or in
# /var/lib/narpipe/spool. These are the same units as contrib/systemd/.
#
# Usage, in configuration.nix:
#
#   imports = [ /src/narpipe/contrib/nixos/module.nix ];
#   services.narpipe = {
#     enable = true;
#     package = pkgs.rustPlatform.buildRustPackage { ... };  # see `package` below
#     cacheUrl = "s3://my-cache?region=eu-central-1";
#     secretKeyFile = "/var/lib/secrets/narpipe-cache.sk";
#     credentialsFile = "/var/lib/secrets/narpipe.env";      # AWS_ACCESS_KEY_ID=...
#   };
#
# The service may write anywhere but /usr, /boot, /efi, /etc, /home, /root and
# /run/user (ProtectSystem=full, ProtectHome=read-only), so a file:// cache under /srv
# or /var just works. For one under /home, also set
#   systemd.services.narpipe-upload.serviceConfig.ReadWritePaths = [ "/home/cache" ];
# To let a group other than root write to the FIFO:
#   systemd.sockets.narpipe.socketConfig.SocketGroup = lib.mkForce "mygroup";
# and remove /run/narpipe.fifo before the socket unit starts with it (systemd refuses
# an existing FIFO whose owner or mode differs; see contrib/systemd/narpipe.socket).
#
# services.narpipe.serve runs `serve` (narpipe-serve.service, the unit of
# contrib/systemd/narpipe-serve.service): the cache, or this machine's store, over
# HTTP for other machines, which then need no cloud credentials:
#
#   services.narpipe.serve = {
#     enable = true;
#     source = "s3://my-cache?region=eu-central-1";   # or "local"
#     listen = "0.0.0.0:8080";
#     openFirewall = true;
#     credentialsFile = "/var/lib/secrets/narpipe-serve.env";
#   };

{ config, lib, pkgs, ... }:

let
  cfg = config.services.narpipe;

  fifo = "/run/narpipe.fifo";

  # upload's command line. Values are attached with `=`, as a separate value starting
  # with `-` (a regex such as "-source$") would be taken for an option. Files are
  # turned into strings with toString, so that a path literal such as ./cache.sk is
  # referred to where it is and never copied into the world-readable Nix store.
  uploadArgs =
    [ "--compression=${cfg.compression}" ]
    ++ lib.optional (cfg.compressionLevel != null)
      "--compression-level=${toString cfg.compressionLevel}"
    ++ lib.optional (cfg.jobs != null) "--jobs=${toString cfg.jobs}"
    ++ lib.optional (cfg.secretKeyFile != null)
      "--secret-key-file=${toString cfg.secretKeyFile}"
    ++ lib.optional (cfg.metricsListen != null) "--metrics-listen=${cfg.metricsListen}"
    ++ map (re: "--exclude=${re}") cfg.exclude
    ++ map (re: "--include=${re}") cfg.include
    ++ cfg.extraArgs
    # The FIFO comes from the socket unit (fd 3), so there is no --input.
    ++ [ "--" ] ++ lib.toList cfg.cacheUrl;

  # Started through a script because systemd's ExecStart= has quoting rules of its own
  # and expands `$` and `%` (which regular expressions and URLs may contain); the shell
  # gets exactly what lib.escapeShellArgs produces. `exec` keeps the PID, so upload is
  # the main process for sd_notify and LISTEN_PID.
  startUpload = pkgs.writeShellScript "narpipe-upload-start" ''
    exec ${cfg.package}/bin/upload ${lib.escapeShellArgs uploadArgs}
  '';

  # Same behaviour as contrib/post-build-hook: never fails or holds up a build. send
  # takes the paths from $OUT_PATHS (or $DRV_PATH, see NixOS/nix#6446), waits at most
  # its timeout (default 5 s) for the pipe and otherwise spools them for upload; any
  # problem only shows in the build log.
  serveCfg = cfg.serve;

  serveArgs =
    [ "--listen=${serveCfg.listen}" ]
    ++ lib.optionals (serveCfg.cacheSize != null) [
      "--cache-dir=/var/cache/narpipe-serve"
      "--cache-size=${serveCfg.cacheSize}"
    ]
    ++ lib.optional (serveCfg.secretKeyFile != null)
      "--secret-key-file=${toString serveCfg.secretKeyFile}"
    ++ serveCfg.extraArgs
    ++ [ "--" serveCfg.source ];

  startServe = pkgs.writeShellScript "narpipe-serve-start" ''
    exec ${cfg.package}/bin/serve ${lib.escapeShellArgs serveArgs}
  '';

  postBuildHook = pkgs.writeShellScript "narpipe-post-build-hook" ''
    set -u
    ${cfg.package}/bin/send -o ${fifo} \
      || echo "narpipe post-build-hook: paths of ''${DRV_PATH:-?} not queued for upload" >&2
    exit 0
  '';
in
{
  options.services.narpipe = {
    enable = lib.mkEnableOption "narpipe, which uploads the results of local Nix builds to a binary cache";

    package = lib.mkOption {
      type = lib.types.package;
      description = ''
        The narpipe package, providing `bin/upload` and `bin/send`. Nixpkgs has none:
        build it from a checkout of the narpipe repository, for example with
        `rustPlatform.buildRustPackage` (as in the example), or wrap prebuilt binaries
        in a package with the same layout.
      '';
      example = lib.literalExpression ''
        pkgs.rustPlatform.buildRustPackage {
          pname = "narpipe";
          version = "0.1.0";
          src = /src/narpipe;
          cargoLock.lockFile = /src/narpipe/Cargo.lock;
          # The test suite runs nix commands, which the build sandbox does not have.
          doCheck = false;
        }
      '';
    };

    cacheUrl = lib.mkOption {
      type = lib.types.either lib.types.str (lib.types.listOf lib.types.str);
      description = ''
        The binary cache: `file:///dir`,
        `s3://bucket[/prefix]?region=&endpoint=&profile=&scheme=`,
        `gs://bucket[/prefix]?service-account=&endpoint=`,
        `azure://container[/prefix]?account=&endpoint=` or `http(s)://host/prefix`;
        or a list of them, to push every build to each (each NAR is made once).
      '';
      example = "s3://my-nix-cache?region=eu-central-1";
    };

    secretKeyFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      description = ''
        A Nix secret key (from `nix-store --generate-binary-cache-key`) to sign the
        uploaded paths with. Give it as a string (an absolute path) so that the key is
        read where it is at run time and never copied into the Nix store. More keys
        can be added with `extraArgs`.
      '';
      example = "/var/lib/secrets/narpipe-cache.sk";
    };

    credentialsFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      description = ''
        An environment file (systemd `EnvironmentFile=`, `NAME=value` lines) for the
        upload service, with the cache's credentials: `AWS_ACCESS_KEY_ID`,
        `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`, ...) for S3,
        `GOOGLE_APPLICATION_CREDENTIALS` for GCS. Any `NARPIPE_*` setting may go there
        too. Give it as a string so that it is never copied into the Nix store.
      '';
      example = "/var/lib/secrets/narpipe.env";
    };

    compression = lib.mkOption {
      type = lib.types.enum [ "zstd" "xz" "none" ];
      default = "zstd";
      description = "Compression of the uploaded NARs.";
    };

    compressionLevel = lib.mkOption {
      type = lib.types.nullOr lib.types.int;
      default = null;
      description = ''
        Compression level (zstd 1-19, xz 0-9); null for the algorithm's default.
      '';
      example = 9;
    };

    jobs = lib.mkOption {
      type = lib.types.nullOr lib.types.ints.positive;
      default = null;
      description = "Paths uploaded at once; null for the number of CPUs.";
      example = 4;
    };

    exclude = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      description = ''
        Regular expressions; store paths whose name matches any of them are not
        uploaded (nor what refers to them). Each becomes one `--exclude=` argument.
      '';
      example = [ "-source$" "\\.iso$" ];
    };

    include = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      description = ''
        Regular expressions; if any are given, only store paths whose name matches
        one of them are uploaded. Each becomes one `--include=` argument.
      '';
      example = [ "-myproject-" ];
    };

    metricsListen = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      description = ''
        IP address and port (`127.0.0.1:9145`, `[::1]:9145`) at which upload serves
        Prometheus metrics (`/metrics`); null for none. The firewall is not opened.
      '';
      example = "127.0.0.1:9145";
    };

    extraArgs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      description = "Further arguments for `upload`, e.g. `--priority 30`.";
      example = [ "--priority" "30" "--max-attempts" "10" ];
    };

    serve = {
      enable = lib.mkEnableOption "narpipe's `serve`, a read-only HTTP binary cache over a cache or the local Nix store";

      source = lib.mkOption {
        type = lib.types.str;
        default = "local";
        description = ''
          What to serve: `local` (this machine's Nix store, narinfos signed with
          `secretKeyFile`) or a cache URL as for `cacheUrl`.
        '';
        example = "s3://my-nix-cache?region=eu-central-1";
      };

      listen = lib.mkOption {
        type = lib.types.str;
        default = "127.0.0.1:8080";
        description = "Address and port to listen on.";
        example = "0.0.0.0:8080";
      };

      openFirewall = lib.mkOption {
        type = lib.types.bool;
        default = false;
        description = "Whether to open the port of `listen` in the firewall.";
      };

      secretKeyFile = lib.mkOption {
        type = lib.types.nullOr lib.types.path;
        default = null;
        description = ''
          For `source = "local"`: a Nix secret key to sign narinfos with. Give it as a
          string so that it is never copied into the Nix store.
        '';
        example = "/var/lib/secrets/nix-cache.sk";
      };

      credentialsFile = lib.mkOption {
        type = lib.types.nullOr lib.types.path;
        default = null;
        description = ''
          An environment file with the cache's credentials (as for the upload
          service's `credentialsFile`). Give it as a string.
        '';
        example = "/var/lib/secrets/narpipe-serve.env";
      };

      cacheSize = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        description = ''
          For a remote cache: keep its answers in /var/cache/narpipe-serve, at most
          this much (`20G`), so that what one client fetched is served to the next
          without asking the bucket. null: keep nothing.
        '';
        example = "20G";
      };

      extraArgs = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        description = "Further arguments for `serve`.";
        example = [ "--priority" "30" ];
      };
    };

    postBuildHook.enable = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Whether to set Nix's `post-build-hook` to a script that hands every build's
        outputs to narpipe (it never fails a build). Turn it off to call
        `''${config.services.narpipe.package}/bin/send -o ${fifo}` from a hook of
        your own.
      '';
    };
  };

  config = lib.mkMerge [ (lib.mkIf cfg.enable {
    nix.settings.post-build-hook = lib.mkIf cfg.postBuildHook.enable "${postBuildHook}";

    # The FIFO. systemd keeps it open, so what is written while upload is stopped or
    # restarting waits in the pipe and starts the service again. Stopping the socket
    # unit itself closes the pipe; the service, ordered after it, is stopped (drained)
    # first.
    systemd.sockets.narpipe = {
      description = "narpipe: pipe for store paths to upload to a binary cache";
      wantedBy = [ "sockets.target" ];
      socketConfig = {
        ListenFIFO = fifo;
        # The Nix daemon runs the post-build-hook as root.
        SocketMode = "0620";
        SocketUser = "root";
        SocketGroup = "root";
        # Leave the FIFO in place when the socket stops: senders then find a pipe
        # without a reader and spool at once.
        RemoveOnStop = "no";
        Service = "narpipe-upload.service";
      };
    };

    systemd.services.narpipe-upload = {
      description = "narpipe: upload Nix build results to a binary cache";
      requires = [ "narpipe.socket" ];
      after = [ "narpipe.socket" "network-online.target" ];
      wants = [ "network-online.target" ];
      # Also start at boot, so that work left in the queue or spool is resumed
      # without waiting for the next build.
      wantedBy = [ "multi-user.target" ];
      # upload runs `nix` and `nix-store`.
      path = [ config.nix.package ];
      # Note: a configuration switch that changes this unit stops the service, which
      # drains (up to TimeoutStopSec) before the switch goes on.
      serviceConfig = {
        # READY=1 once the cache is checked, STOPPING=1 when draining.
        Type = "notify";
        NotifyAccess = "main";
        Sockets = "narpipe.socket";
        # $STATE_DIRECTORY = /var/lib/narpipe: the queue (queue.sqlite), and the spool in
        # /var/lib/narpipe/spool, which is also send's default.
        StateDirectory = "narpipe";
        EnvironmentFile = lib.mkIf (cfg.credentialsFile != null) (toString cfg.credentialsFile);
        ExecStart = "${startUpload}";
        # Stopping drains: SIGHUP to the main process only, so the nix commands it
        # runs finish normally; whatever is left after TimeoutStopSec is killed.
        KillSignal = "SIGHUP";
        KillMode = "mixed";
        TimeoutStopSec = 600;
        Restart = "on-failure";
        RestartSec = 2;

        # Hardening that keeps /srv, /var and /nix writable (file:// caches, the Nix
        # database); see the top of this file for caches under /home.
        NoNewPrivileges = true;
        ProtectSystem = "full";
        ProtectHome = "read-only";
        PrivateTmp = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        RestrictSUIDSGID = true;
        RestrictRealtime = true;
        LockPersonality = true;
        SystemCallArchitectures = "native";
      };
    };
  })

  (lib.mkIf serveCfg.enable {
    networking.firewall.allowedTCPPorts = lib.mkIf serveCfg.openFirewall [
      (lib.toInt (lib.last (lib.splitString ":" serveCfg.listen)))
    ];

    systemd.services.narpipe-serve = {
      description = "narpipe: serve a Nix binary cache over HTTP";
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      wantedBy = [ "multi-user.target" ];
      # serve local runs `nix path-info`.
      path = [ config.nix.package ];
      serviceConfig = {
        # READY=1 once it listens and the cache answered.
        Type = "notify";
        NotifyAccess = "main";
        EnvironmentFile = lib.mkIf (serveCfg.credentialsFile != null) (toString serveCfg.credentialsFile);
        # /var/cache/narpipe-serve, for cacheSize.
        CacheDirectory = "narpipe-serve";
        ExecStart = "${startServe}";
        TimeoutStopSec = 30;
        Restart = "on-failure";
        RestartSec = 2;

        # Read-only but for the cache directory and Nix's state directory (its locks,
        # for nix path-info).
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ReadWritePaths = [ "-/nix/var/nix" ];
        ProtectHome = "read-only";
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        RestrictSUIDSGID = true;
        RestrictRealtime = true;
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
        LockPersonality = true;
        SystemCallArchitectures = "native";
      };
    };
  })
  ];
}
