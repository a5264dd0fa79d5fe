package raftnode

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
)

// raftLogger adapts slog to raft.Logger. Raft's Debug and Info chatter goes
// to slog's debug level except for elections and leader changes, which a
// reader of the logs wants by default, and which raft logs at Info.
type raftLogger struct{ l *slog.Logger }

func newRaftLogger(l *slog.Logger) *raftLogger { return &raftLogger{l: l} }

func (r *raftLogger) log(level slog.Level, msg string) {
	if !r.l.Enabled(context.Background(), level) {
		return
	}
	r.l.Log(context.Background(), level, msg, "component", "raft")
}

func (r *raftLogger) Debug(v ...any) { r.log(slog.LevelDebug, fmt.Sprint(v...)) }
func (r *raftLogger) Debugf(format string, v ...any) {
	r.log(slog.LevelDebug, fmt.Sprintf(format, v...))
}
func (r *raftLogger) Info(v ...any) { r.log(slog.LevelDebug, fmt.Sprint(v...)) }
func (r *raftLogger) Infof(format string, v ...any) {
	level := slog.LevelDebug
	if isElection(format) {
		level = slog.LevelInfo
	}
	r.log(level, fmt.Sprintf(format, v...))
}
func (r *raftLogger) Warning(v ...any) { r.log(slog.LevelWarn, fmt.Sprint(v...)) }
func (r *raftLogger) Warningf(format string, v ...any) {
	r.log(slog.LevelWarn, fmt.Sprintf(format, v...))
}
func (r *raftLogger) Error(v ...any) { r.log(slog.LevelError, fmt.Sprint(v...)) }
func (r *raftLogger) Errorf(format string, v ...any) {
	r.log(slog.LevelError, fmt.Sprintf(format, v...))
}

// Fatal and Panic are raft's "broken invariant" paths: raft expects them
// not to return, so both panic after logging.
func (r *raftLogger) Fatal(v ...any)                 { r.Panic(v...) }
func (r *raftLogger) Fatalf(format string, v ...any) { r.Panicf(format, v...) }
func (r *raftLogger) Panic(v ...any)                 { s := fmt.Sprint(v...); r.log(slog.LevelError, s); panic(s) }
func (r *raftLogger) Panicf(format string, v ...any) {
	s := fmt.Sprintf(format, v...)
	r.log(slog.LevelError, s)
	panic(s)
}

func isElection(format string) bool {
	return strings.Contains(format, "became leader") || strings.Contains(format, "became follower")
}
