# Evaluates nixos-module.nix with the real nixpkgs module system and small
# stand-ins for the NixOS options it sets, and returns what it generates.
# Used by module_test.go:
#   nix-instantiate --eval --strict --json nixos/eval.nix \
#     --arg lib 'import /path/to/nixpkgs/lib' --arg configuration 'import ./cfg.nix'
{ lib, configuration }:
let
  anything = lib.mkOption { type = lib.types.anything; default = { }; };
  stubs = {
    options = {
      assertions = lib.mkOption { type = lib.types.listOf lib.types.unspecified; default = [ ]; };
      users.groups = lib.mkOption { type = lib.types.attrsOf lib.types.anything; default = { }; };
      environment.systemPackages = lib.mkOption { type = lib.types.listOf lib.types.anything; default = [ ]; };
      nix.settings = lib.mkOption { type = lib.types.attrsOf lib.types.anything; default = { }; };
      nix.package = lib.mkOption { type = lib.types.anything; default = "/nix/store/00000000000000000000000000000000-nix"; };
      systemd.tmpfiles.rules = lib.mkOption { type = lib.types.listOf lib.types.str; default = [ ]; };
      systemd.services = lib.mkOption { type = lib.types.attrsOf lib.types.anything; default = { }; };
      systemd.timers = lib.mkOption { type = lib.types.attrsOf lib.types.anything; default = { }; };
      systemd.sockets = lib.mkOption { type = lib.types.attrsOf lib.types.anything; default = { }; };
    };
  };
  fakePackage = name: { type = "derivation"; inherit name; outPath = "/nix/store/11111111111111111111111111111111-${name}"; };
  pkgs = {
    callPackage = _: _: fakePackage "nixspool-0.1.0";
    # A derivation-like value: interpolates as its store path, keeps its text.
    writeShellScript = name: text: fakePackage name // { inherit text; };
    coreutils = fakePackage "coreutils";
  };
  eval = lib.evalModules {
    modules = [ stubs ../nixos-module.nix configuration ];
    specialArgs = { inherit pkgs; };
  };
  c = eval.config;
  enabled = c.services.nixspool.enable;
in
{
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) c.assertions);
  groups = builtins.attrNames c.users.groups;
  tmpfiles = c.systemd.tmpfiles.rules;
  packages = map (p: p.name) c.environment.systemPackages;
} // lib.optionalAttrs enabled {
  hook = "${c.nix.settings.post-build-hook}";
  hookText = c.nix.settings.post-build-hook.text;
  service = {
    inherit (c.systemd.services.nixspool) script wantedBy requires after;
    serviceConfig = c.systemd.services.nixspool.serviceConfig;
  };
  socket = c.systemd.sockets.nixspool;
  gcService = c.systemd.services.nixspool-gc or null;
  gcTimer = c.systemd.timers.nixspool-gc or null;
}
