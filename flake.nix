{
  description = "nixspool: publish Nix build results to an S3 binary cache, durably and without slowing builds";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs: rec {
        nixspool = pkgs.callPackage ./package.nix { };
        default = nixspool;
      });

      nixosModules.default = { pkgs, lib, ... }: {
        imports = [ ./nixos-module.nix ];
        services.nixspool.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      };

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell { packages = [ pkgs.go pkgs.minio pkgs.gnumake ]; };
      });
    };
}
