# nixspool, built with buildGoModule.
#
# vendorHash pins the Go module dependencies. After changing go.mod/go.sum,
# set it to lib.fakeHash, run `nix build .#default`, and copy the hash Nix
# reports ("got: sha256-…"); or compute it without nixpkgs:
#   go mod vendor && nix hash path vendor && rm -r vendor
{ lib, buildGoModule }:

buildGoModule rec {
  pname = "nixspool";
  version = "0.1.0";

  src = lib.cleanSourceWith {
    src = ./.;
    filter = path: type:
      let base = baseNameOf path; in
      !(builtins.elem base [ "bin" "var" ".tools" "result" ]);
  };

  vendorHash = "sha256-DU9iNmkCk2TTEeG/fG6OcXHbJuI/Gt4RzOFPp3VVP8w=";

  subPackages = [ "cmd/hook" "cmd/agentd" "cmd/agentctl" ];

  ldflags = [ "-s" "-w" "-X github.com/nixspool/nixspool/internal/agent.Version=${version}" ];

  # The tests need a writable Nix store, root and a MinIO server: `make test`.
  doCheck = false;

  # "hook" is too generic a name for a system profile.
  postInstall = ''
    mv $out/bin/hook $out/bin/nixspool-hook
    install -Dm644 systemd/nixspool.socket systemd/nixspool.service -t $out/lib/systemd/system
    substituteInPlace $out/lib/systemd/system/nixspool.service \
      --replace-fail /usr/local/bin/agentd $out/bin/agentd
  '';

  meta = {
    description = "Publishes Nix build results to an S3 binary cache from a post-build hook, durably and without slowing builds";
    homepage = "https://github.com/nixspool/nixspool";
    license = lib.licenses.mit;
    mainProgram = "agentd";
    platforms = lib.platforms.linux;
  };
}
