package testkit

import (
	"strings"
	"sync"
)

// LogBuffer collects log lines that a node or transport writes from its
// goroutines while a test reads them. The zero value is ready to use.
type LogBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *LogBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *LogBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// HasError reports whether a line logged at ERROR (slog's text format)
// mentions every one of words.
func (l *LogBuffer) HasError(words ...string) bool {
	for _, line := range strings.Split(l.String(), "\n") {
		if !strings.Contains(line, "level=ERROR") {
			continue
		}
		all := true
		for _, w := range words {
			all = all && strings.Contains(line, w)
		}
		if all {
			return true
		}
	}
	return false
}
