package httpcache

import (
	"fmt"
	"os"
	"strings"
)

// credential is a login and password for the cache's host.
type credential struct {
	login, password string
}

// lookupNetrc reads the netrc file at path and returns the credentials of
// its entry for host ("machine HOST", else "default"), or nil if it has
// none. The format is curl's, which Nix uses: whitespace-separated
// tokens; machine, default, login, password, account and macdef (whose
// definition runs to the next empty line). Errors name the file and
// never quote it.
func lookupNetrc(path, host string) (*credential, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("netrc: %w", err)
	}
	var found, def *credential
	var cur *credential
	lines := strings.Split(string(data), "\n")
	var toks []string
	for i := 0; i < len(lines); i++ {
		line := lines[i]
		if strings.HasPrefix(strings.TrimSpace(line), "#") {
			continue
		}
		fields := strings.Fields(line)
		for j := 0; j < len(fields); j++ {
			if fields[j] == "macdef" {
				// Skip the macro: the rest of this line and every line
				// up to an empty one.
				for i+1 < len(lines) && strings.TrimSpace(lines[i+1]) != "" {
					i++
				}
				break
			}
			toks = append(toks, fields[j])
		}
	}
	for i := 0; i < len(toks); i++ {
		switch toks[i] {
		case "machine":
			if i+1 >= len(toks) {
				return nil, fmt.Errorf("netrc %s: machine without a name", path)
			}
			i++
			cur = &credential{}
			if toks[i] == host && found == nil {
				found = cur
			}
		case "default":
			cur = &credential{}
			if def == nil {
				def = cur
			}
		case "login", "password", "account":
			if i+1 >= len(toks) {
				return nil, fmt.Errorf("netrc %s: %s without a value", path, toks[i])
			}
			i++
			if cur == nil {
				return nil, fmt.Errorf("netrc %s: %s outside a machine entry", path, toks[i-1])
			}
			switch toks[i-1] {
			case "login":
				cur.login = toks[i]
			case "password":
				cur.password = toks[i]
			}
		default:
			return nil, fmt.Errorf("netrc %s: unexpected token (not machine, default, login, password, account or macdef)", path)
		}
	}
	if found == nil {
		found = def
	}
	if found == nil || (found.login == "" && found.password == "") {
		return nil, nil
	}
	return found, nil
}
