package awscreds

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/minio/minio-go/v7/pkg/credentials"
)

// Profile gives the credentials of a profile of the shared config and
// credentials files: role_arn (through STS AssumeRole with the keys of
// source_profile or credential_source), a static key pair, or
// credential_process. SSO profiles are left to SSO, which comes before.
// The files are read again whenever the credentials expire.
type Profile struct {
	credentials.Expiry
	Name string // empty: AWS_PROFILE, then "default"

	desc  string
	inner Link
}

// RetrieveWithCredContext implements credentials.Provider.
func (p *Profile) RetrieveWithCredContext(cc *credentials.CredContext) (credentials.Value, error) {
	name := profileName(p.Name)
	p.desc = "profile " + name
	ps, err := loadProfiles()
	if err != nil {
		return credentials.Value{}, err
	}
	prof, ok := ps[name]
	switch {
	case !ok && p.Name == "":
		return credentials.Value{}, ErrNotConfigured
	case !ok:
		return credentials.Value{}, errors.New("no such profile in the shared config or credentials file")
	case isSSO(prof) && prof["role_arn"] == "" && !hasKeys(prof):
		return credentials.Value{}, ErrNotConfigured
	}
	l, err := resolve(ps, name, 0)
	if err != nil {
		return credentials.Value{}, err
	}
	p.inner, p.desc = l, l.Describe()
	v, err := l.RetrieveWithCredContext(cc)
	if err != nil {
		return credentials.Value{}, err
	}
	expiry(&p.Expiry, v.Expiration)
	return v, nil
}

// Retrieve implements credentials.Provider.
func (p *Profile) Retrieve() (credentials.Value, error) { return p.RetrieveWithCredContext(nil) }

// Describe implements Link.
func (p *Profile) Describe() string {
	if p.desc == "" {
		return "profile " + profileName(p.Name)
	}
	return p.desc
}

// maxSourceProfiles bounds a chain of source_profile references (and
// catches loops).
const maxSourceProfiles = 8

// resolve returns the link giving the credentials of profile name.
func resolve(ps profiles, name string, depth int) (Link, error) {
	if depth > maxSourceProfiles {
		return nil, fmt.Errorf("profile %s: source_profile chain longer than %d (a loop?)", name, maxSourceProfiles)
	}
	prof, ok := ps[name]
	if !ok {
		return nil, fmt.Errorf("source_profile %s: no such profile", name)
	}
	desc := "profile " + name
	if arn := prof["role_arn"]; arn != "" {
		src, err := roleSource(ps, name, prof, depth)
		if err != nil {
			return nil, fmt.Errorf("profile %s: %w", name, err)
		}
		ar := &AssumeRole{Source: src, RoleARN: arn, SessionName: prof["role_session_name"], ExternalID: prof["external_id"], Region: prof["region"],
			desc: fmt.Sprintf("%s (assume role %s with %s)", desc, arn, src.Describe())}
		if d := prof["duration_seconds"]; d != "" {
			n, err := strconv.Atoi(d)
			if err != nil || n <= 0 {
				return nil, fmt.Errorf("profile %s: duration_seconds %q is not a number of seconds", name, d)
			}
			ar.Duration = time.Duration(n) * time.Second
		}
		return ar, nil
	}
	if hasKeys(prof) {
		return &Static{Value: credentials.Value{AccessKeyID: prof["aws_access_key_id"], SecretAccessKey: prof["aws_secret_access_key"],
			SessionToken: prof["aws_session_token"], SignerType: credentials.SignatureV4}, desc: desc}, nil
	}
	if prof["aws_access_key_id"] != "" || prof["aws_secret_access_key"] != "" {
		return nil, fmt.Errorf("profile %s: aws_access_key_id and aws_secret_access_key must both be set", name)
	}
	if cmd := prof["credential_process"]; cmd != "" {
		return &Process{Command: cmd, desc: desc + " (credential_process)"}, nil
	}
	if isSSO(prof) && depth > 0 {
		return &SSO{Profile: name}, nil
	}
	return nil, fmt.Errorf("profile %s has no credentials (no aws_access_key_id, role_arn or credential_process)", name)
}

// roleSource is the link whose keys call AssumeRole for a role profile.
func roleSource(ps profiles, name string, prof map[string]string, depth int) (Link, error) {
	sp, cs := prof["source_profile"], prof["credential_source"]
	switch {
	case sp != "" && cs != "":
		return nil, errors.New("both source_profile and credential_source are set")
	case sp == name:
		if !hasKeys(prof) {
			return nil, errors.New("source_profile names the profile itself, which has no aws_access_key_id")
		}
		return &Static{Value: credentials.Value{AccessKeyID: prof["aws_access_key_id"], SecretAccessKey: prof["aws_secret_access_key"],
			SessionToken: prof["aws_session_token"], SignerType: credentials.SignatureV4}, desc: "profile " + name}, nil
	case sp != "":
		return resolve(ps, sp, depth+1)
	}
	switch cs {
	case "Environment":
		return &Env{}, nil
	case "Ec2InstanceMetadata":
		return &IMDS{}, nil
	case "EcsContainer":
		return &ECS{}, nil
	case "":
		return nil, errors.New("role_arn without source_profile or credential_source")
	}
	return nil, fmt.Errorf("credential_source %q is not Environment, Ec2InstanceMetadata or EcsContainer", cs)
}

// Static is a key pair from a profile.
type Static struct {
	never
	Value credentials.Value
	desc  string
}

// RetrieveWithCredContext implements credentials.Provider.
func (s *Static) RetrieveWithCredContext(*credentials.CredContext) (credentials.Value, error) {
	return s.Value, nil
}

// Retrieve implements credentials.Provider.
func (s *Static) Retrieve() (credentials.Value, error) { return s.Value, nil }

// Describe implements Link.
func (s *Static) Describe() string { return s.desc }

// SSO gives the credentials of a profile configured for AWS SSO (IAM
// Identity Center: sso_session or sso_start_url, sso_account_id,
// sso_role_name), from the token `aws sso login` cached. Other profiles
// are not its business.
type SSO struct {
	credentials.Expiry
	Profile string
}

// RetrieveWithCredContext implements credentials.Provider.
func (s *SSO) RetrieveWithCredContext(cc *credentials.CredContext) (credentials.Value, error) {
	name := profileName(s.Profile)
	ps, err := loadProfiles()
	if err != nil || !isSSO(ps[name]) {
		return credentials.Value{}, ErrNotConfigured
	}
	// minio-go's file provider speaks to the SSO portal; it reads the same
	// two files (AWS_CONFIG_FILE, AWS_SHARED_CREDENTIALS_FILE).
	v, err := (&credentials.FileAWSCredentials{Profile: name}).RetrieveWithCredContext(cc)
	if err != nil {
		return credentials.Value{}, err
	}
	expiry(&s.Expiry, v.Expiration)
	return v, nil
}

// Retrieve implements credentials.Provider.
func (s *SSO) Retrieve() (credentials.Value, error) { return s.RetrieveWithCredContext(nil) }

// Describe implements Link.
func (s *SSO) Describe() string { return "sso (profile " + profileName(s.Profile) + ")" }

// stsEndpoint is where STS requests go: AWS_ENDPOINT_URL_STS if set (an
// S3-compatible server's own STS, e.g. MinIO's), else the region's
// endpoint, else the global one.
func stsEndpoint(region string) string {
	if e := os.Getenv("AWS_ENDPOINT_URL_STS"); e != "" {
		return e
	}
	if region == "" {
		return "https://sts.amazonaws.com"
	}
	if len(region) > 3 && region[:3] == "cn-" {
		return "https://sts." + region + ".amazonaws.com.cn"
	}
	return "https://sts." + region + ".amazonaws.com"
}
