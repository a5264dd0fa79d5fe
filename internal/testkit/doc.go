// Package testkit holds what tests of several packages share to put a
// node in trouble or watch it: faults injected into a running process and
// a log sink safe to read while a node writes to it. Only tests import it.
package testkit
