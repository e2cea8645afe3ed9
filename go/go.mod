module oxcow.dev/oxcow

go 1.19
