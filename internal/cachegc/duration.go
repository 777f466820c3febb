package cachegc

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// ParseDuration reads a Go duration ("90m", "720h") or a number of days
// ("30d"), as retentions are usually said.
func ParseDuration(s string) (time.Duration, error) {
	if d, ok := strings.CutSuffix(s, "d"); ok {
		n, err := strconv.ParseFloat(d, 64)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("%q: want a duration such as 30d, 12h or 90m", s)
		}
		return time.Duration(n * float64(24*time.Hour)), nil
	}
	v, err := time.ParseDuration(s)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("%q: want a duration such as 30d, 12h or 90m", s)
	}
	return v, nil
}

// DurationFlag is a flag.Value for ParseDuration's forms.
type DurationFlag struct{ D *time.Duration }

func (f DurationFlag) String() string {
	if f.D == nil {
		return ""
	}
	return f.D.String()
}

// Set implements flag.Value.
func (f DurationFlag) Set(s string) error {
	d, err := ParseDuration(s)
	if err != nil {
		return err
	}
	*f.D = d
	return nil
}
