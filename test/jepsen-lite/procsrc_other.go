//go:build !linux

package jepsenlite

import "net"

// connOwner needs /proc; elsewhere every peer connection is unidentified
// and follows the conservative rule of Net.link.
func connOwner(net.Conn, []int) int { return 0 }
