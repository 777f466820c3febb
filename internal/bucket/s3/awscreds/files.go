package awscreds

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"gopkg.in/ini.v1"
)

// profiles are the shared config and credentials files read together: a
// profile's keys from both, the credentials file's winning.
type profiles map[string]map[string]string

// profileName is the profile to use: the cache URL's, else AWS_PROFILE,
// else "default".
func profileName(fromURL string) string {
	if fromURL != "" {
		return fromURL
	}
	if p := os.Getenv("AWS_PROFILE"); p != "" {
		return p
	}
	return "default"
}

// loadProfiles reads AWS_CONFIG_FILE (~/.aws/config), whose sections are
// "default" and "profile NAME", and AWS_SHARED_CREDENTIALS_FILE
// (~/.aws/credentials), whose sections are profile names. A missing file
// is no error.
func loadProfiles() (profiles, error) {
	home, _ := os.UserHomeDir()
	path := func(env, name string) string {
		if p := os.Getenv(env); p != "" {
			return p
		}
		return filepath.Join(home, ".aws", name)
	}
	ps := profiles{}
	if err := ps.read(path("AWS_CONFIG_FILE", "config"), true); err != nil {
		return nil, err
	}
	if err := ps.read(path("AWS_SHARED_CREDENTIALS_FILE", "credentials"), false); err != nil {
		return nil, err
	}
	return ps, nil
}

func (ps profiles) read(file string, config bool) error {
	data, err := os.ReadFile(file)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	// As the AWS tools read these files: "#" and ";" start a comment inside
	// a value only after white space (credential_process = sh -c 'a;b').
	f, err := ini.LoadSources(ini.LoadOptions{SpaceBeforeInlineComment: true}, data)
	if err != nil {
		// The parser's error quotes the line, which may hold a secret.
		return fmt.Errorf("%s: not a valid AWS config or credentials file (a line is neither a [section], a comment nor key = value; the line is not shown, it may hold a secret)", file)
	}
	for _, sec := range f.Sections() {
		name := sec.Name()
		if config && name != "default" {
			var ok bool
			if name, ok = strings.CutPrefix(name, "profile "); !ok {
				continue // sso-session, services, …
			}
			name = strings.TrimSpace(name)
		}
		if name == ini.DefaultSection && len(sec.Keys()) == 0 {
			continue
		}
		if ps[name] == nil {
			ps[name] = map[string]string{}
		}
		for _, k := range sec.Keys() {
			ps[name][k.Name()] = k.String()
		}
	}
	return nil
}

// isSSO says whether a profile gets its credentials from AWS SSO (IAM
// Identity Center).
func isSSO(p map[string]string) bool {
	return p["sso_role_name"] != "" || p["sso_session"] != "" || p["sso_start_url"] != ""
}

// hasKeys says whether a profile has a static key pair.
func hasKeys(p map[string]string) bool {
	return p["aws_access_key_id"] != "" && p["aws_secret_access_key"] != ""
}
