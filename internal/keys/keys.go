// Package keys holds the key arithmetic the client, the server and the
// state machine share.
package keys

import "bytes"

// PrefixEnd returns the end of the range of keys that start with prefix:
// the prefix with its last byte below 0xff incremented and what follows
// it dropped; nil (the end of the key space) when every byte is 0xff.
func PrefixEnd(prefix []byte) []byte {
	end := bytes.Clone(prefix)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] < 0xff {
			end[i]++
			return end[:i+1]
		}
	}
	return nil
}
