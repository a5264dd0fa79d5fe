// Package version says which build of kvd and kvctl is running.
package version

import (
	"fmt"
	"runtime/debug"
	"strings"
)

// Version is the release the binaries were built as, set at link time:
//
//	go build -ldflags "-X github.com/kvd/kvd/internal/version.Version=v1.2.0" ./cmd/...
//
// make build sets it from `git describe`. Empty, String falls back on the
// module version Go recorded (a `go install ...@v1.2.0` build), then on
// "devel".
var Version = ""

// API is the client API this build serves and speaks: the protobuf
// package of proto/kvpb. A change that breaks its clients gets a new one.
const API = "kvd.kv.v1"

// Info is what a build knows about itself.
type Info struct {
	Version   string `json:"version"`
	API       string `json:"api"`
	Commit    string `json:"commit,omitempty"`
	CommitAt  string `json:"commit_time,omitempty"`
	Modified  bool   `json:"modified,omitempty"` // built from a tree with uncommitted changes
	GoVersion string `json:"go_version"`
}

// Get reads the version from the link-time variable and the build info Go
// embeds in every binary (module version, VCS revision and time).
func Get() Info {
	info := Info{Version: Version, API: API}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		if info.Version == "" {
			info.Version = "devel"
		}
		return info
	}
	info.GoVersion = bi.GoVersion
	if info.Version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		info.Version = bi.Main.Version
	}
	if info.Version == "" {
		info.Version = "devel"
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			info.Commit = s.Value
		case "vcs.time":
			info.CommitAt = s.Value
		case "vcs.modified":
			info.Modified = s.Value == "true"
		}
	}
	return info
}

// String is the one line `kvd --version` and `kvctl version` print:
// "kvctl v1.2.0 (commit 3f4581e12ab0, 2026-12-03T09:24:54Z, modified) go1.24.1, API kvd.kv.v1".
func (i Info) String() string { return i.Line("") }

// Line is String with the program's name first.
func (i Info) Line(program string) string {
	var b strings.Builder
	if program != "" {
		b.WriteString(program + " ")
	}
	b.WriteString(i.Version)
	var extra []string
	if i.Commit != "" {
		extra = append(extra, "commit "+i.Commit[:min(12, len(i.Commit))])
	}
	if i.CommitAt != "" {
		extra = append(extra, i.CommitAt)
	}
	if i.Modified {
		extra = append(extra, "modified")
	}
	if len(extra) > 0 {
		fmt.Fprintf(&b, " (%s)", strings.Join(extra, ", "))
	}
	if i.GoVersion != "" {
		b.WriteString(" " + i.GoVersion)
	}
	if i.API != "" {
		b.WriteString(", API " + i.API)
	}
	return b.String()
}
