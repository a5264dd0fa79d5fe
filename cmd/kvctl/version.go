package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/kvd/kvd/internal/version"
)

func (a *app) versionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print kvctl's version",
		Long: `Print the version kvctl was built as: the release (set at link time by
make build, from git describe), the commit and its time when Go recorded
them, and the Go version. It asks the cluster nothing.

Output: simple and table print one line; json prints {"version", "api"
(the client API kvctl speaks, the protobuf package kvd.kv.v1), "commit",
"commit_time", "modified", "go_version"}.`,
		Example:     "  kvctl version\n  kvctl version -o json",
		Annotations: map[string]string{outputsKey: "simple,json,table"},
		Args:        exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			info := version.Get()
			if a.output == "json" {
				return writeJSON(a.stdout, info)
			}
			_, err := fmt.Fprintln(a.stdout, info.Line("kvctl"))
			return err
		},
	}
}

// completionCmd writes a shell completion script for root.
func (a *app) completionCmd(root *cobra.Command) *cobra.Command {
	return &cobra.Command{
		Use:   "completion bash|zsh|fish",
		Short: "Print a shell completion script",
		Long: `Print the script that makes the shell complete kvctl's commands and
flags. Load it in the running shell, or install it for every new one:

  bash   source <(kvctl completion bash)
         kvctl completion bash > /etc/bash_completion.d/kvctl
  zsh    source <(kvctl completion zsh)
         kvctl completion zsh > "${fpath[1]}/_kvctl"
  fish   kvctl completion fish | source
         kvctl completion fish > ~/.config/fish/completions/kvctl.fish

bash needs the bash-completion package.`,
		Example:     "  source <(kvctl completion bash)",
		Annotations: map[string]string{outputsKey: "simple"},
		ValidArgs:   []string{"bash", "zsh", "fish"},
		Args:        exactArgs(1, "a shell: bash, zsh or fish"),
		RunE: func(cmd *cobra.Command, args []string) error {
			switch args[0] {
			case "bash":
				return root.GenBashCompletionV2(a.stdout, true)
			case "zsh":
				return root.GenZshCompletion(a.stdout)
			case "fish":
				return root.GenFishCompletion(a.stdout, true)
			}
			return usageErrorf("kvctl completion: unknown shell %q; use bash, zsh or fish", args[0])
		},
	}
}
