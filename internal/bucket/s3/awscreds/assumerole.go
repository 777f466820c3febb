package awscreds

import (
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/minio/minio-go/v7/pkg/credentials"
)

// AssumeRole gives the temporary credentials of a role, asked of STS
// (AssumeRole) with the keys of its source, which are retrieved anew each
// time the role's credentials are renewed.
type AssumeRole struct {
	credentials.Expiry
	Source      Link
	RoleARN     string
	SessionName string        // empty: nixspool-UNIXTIME
	ExternalID  string        // external_id, if the role's trust policy asks for one
	Region      string        // the profile's region; empty: AWS_REGION, then AWS_DEFAULT_REGION
	Duration    time.Duration // zero: one hour

	desc string
}

// RetrieveWithCredContext implements credentials.Provider.
func (a *AssumeRole) RetrieveWithCredContext(cc *credentials.CredContext) (credentials.Value, error) {
	src, err := a.Source.RetrieveWithCredContext(cc)
	if err != nil {
		return credentials.Value{}, fmt.Errorf("source %s: %w", a.Source.Describe(), err)
	}
	region := firstSet(a.Region, os.Getenv("AWS_REGION"), os.Getenv("AWS_DEFAULT_REGION"))
	name := a.SessionName
	if name == "" {
		name = "nixspool-" + strconv.FormatInt(time.Now().Unix(), 10)
	}
	d := a.Duration
	if d == 0 {
		d = time.Hour
	}
	sts := &credentials.STSAssumeRole{
		Client:      httpClient,
		STSEndpoint: stsEndpoint(region),
		Options: credentials.STSAssumeRoleOptions{
			AccessKey: src.AccessKeyID, SecretKey: src.SecretAccessKey, SessionToken: src.SessionToken,
			Location: firstSet(region, "us-east-1"), DurationSeconds: int(d / time.Second),
			RoleARN: a.RoleARN, RoleSessionName: name, ExternalID: a.ExternalID,
		},
	}
	v, err := sts.RetrieveWithCredContext(&credentials.CredContext{Client: httpClient, Context: requestContext(cc)})
	if err != nil {
		return credentials.Value{}, fmt.Errorf("sts AssumeRole %s at %s: %w", a.RoleARN, sts.STSEndpoint, err)
	}
	expiry(&a.Expiry, v.Expiration)
	return v, nil
}

// Retrieve implements credentials.Provider.
func (a *AssumeRole) Retrieve() (credentials.Value, error) { return a.RetrieveWithCredContext(nil) }

// Describe implements Link.
func (a *AssumeRole) Describe() string { return a.desc }

func firstSet(s ...string) string {
	for _, v := range s {
		if v != "" {
			return v
		}
	}
	return ""
}
