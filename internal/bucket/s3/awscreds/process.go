package awscreds

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/minio/minio-go/v7/pkg/credentials"
)

// Process runs a profile's credential_process, without a shell, and reads
// the credentials it prints as JSON ({"Version": 1, "AccessKeyId",
// "SecretAccessKey", "SessionToken", "Expiration"}). Its standard error
// goes to agentd's.
type Process struct {
	credentials.Expiry
	Command string // split into words as a shell would (quotes, backslashes), not run by one

	desc string
}

// processTimeout bounds one run of a credential_process.
const processTimeout = time.Minute

// processOutput is what a credential_process prints.
type processOutput struct {
	Version         int
	AccessKeyID     string `json:"AccessKeyId"`
	SecretAccessKey string
	SessionToken    string
	Expiration      *time.Time
}

// RetrieveWithCredContext implements credentials.Provider.
func (p *Process) RetrieveWithCredContext(cc *credentials.CredContext) (credentials.Value, error) {
	argv, err := splitWords(p.Command)
	if err != nil {
		return credentials.Value{}, fmt.Errorf("credential_process: %w", err)
	}
	ctx, cancel := context.WithTimeout(requestContext(cc), processTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Stderr = os.Stderr
	// A helper's child that keeps stdout open must not hold the caller
	// past the timeout.
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.Output()
	if err != nil {
		// Neither its output nor its arguments: either may hold a secret.
		return credentials.Value{}, fmt.Errorf("credential_process %s: %w", argv[0], err)
	}
	var po processOutput
	if err := json.Unmarshal(out, &po); err != nil {
		return credentials.Value{}, fmt.Errorf("credential_process %s: output is not the expected JSON: %w", argv[0], scrubJSONError(err))
	}
	switch {
	case po.Version != 1:
		return credentials.Value{}, fmt.Errorf("credential_process %s: Version %d, want 1", argv[0], po.Version)
	case po.AccessKeyID == "" || po.SecretAccessKey == "":
		return credentials.Value{}, fmt.Errorf("credential_process %s: no AccessKeyId or SecretAccessKey", argv[0])
	}
	v := credentials.Value{AccessKeyID: po.AccessKeyID, SecretAccessKey: po.SecretAccessKey, SessionToken: po.SessionToken, SignerType: credentials.SignatureV4}
	if po.Expiration != nil {
		v.Expiration = *po.Expiration
	}
	expiry(&p.Expiry, v.Expiration)
	return v, nil
}

// scrubJSONError keeps a JSON error's kind without the value it quotes.
func scrubJSONError(err error) error {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Errorf("syntax error at byte %d", se.Offset)
	}
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		return fmt.Errorf("field %s has the wrong type", te.Field)
	}
	return errors.New("cannot decode")
}

// Retrieve implements credentials.Provider.
func (p *Process) Retrieve() (credentials.Value, error) { return p.RetrieveWithCredContext(nil) }

// Describe implements Link.
func (p *Process) Describe() string {
	if p.desc == "" {
		return "credential_process"
	}
	return p.desc
}

// splitWords splits a command line into words as a POSIX shell does,
// without expanding anything: white space separates words, single quotes
// keep everything, double quotes keep everything but \" \\ \$ \`, a
// backslash outside quotes keeps the next character.
func splitWords(s string) ([]string, error) {
	var words []string
	var w strings.Builder
	inWord := false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n':
			if inWord {
				words, inWord = append(words, w.String()), false
				w.Reset()
			}
			continue
		case c == '\'':
			j := strings.IndexByte(s[i+1:], '\'')
			if j < 0 {
				return nil, errors.New("unterminated single quote")
			}
			w.WriteString(s[i+1 : i+1+j])
			i += j + 1
		case c == '"':
			i++
			for ; i < len(s) && s[i] != '"'; i++ {
				if s[i] == '\\' && i+1 < len(s) && strings.IndexByte("\"\\$`", s[i+1]) >= 0 {
					i++
				}
				w.WriteByte(s[i])
			}
			if i >= len(s) {
				return nil, errors.New("unterminated double quote")
			}
		case c == '\\':
			if i+1 >= len(s) {
				return nil, errors.New("backslash at the end")
			}
			i++
			w.WriteByte(s[i])
		default:
			w.WriteByte(c)
		}
		inWord = true
	}
	if inWord {
		words = append(words, w.String())
	}
	if len(words) == 0 {
		return nil, errors.New("empty command")
	}
	return words, nil
}
